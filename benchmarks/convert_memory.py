"""Peak memory and time of `navil convert` on a large synthetic original checkpoint (or of `navil
init-from-llm` on a large synthetic LLM: `--task init`), against a plain copy of the same files.

The checkpoint has NaViL-9B's real widths (Qwen3-8B with a visual expert of every attention
projection and FFN, a 24-layer 1152-wide ViT) and `--layers` of its 36 decoder layers, random bf16
weights in shards of `--shard-size`, and the tiny fixture tokenizer (the tokenizer does not change
what is measured). Each step runs in its own process; its peak resident memory is the kernel's
high-water mark (`VmHWM`). The conversion runs with full verification.

    python benchmarks/convert_memory.py --layers 18              # ~17 GB, NaViL-9B widths
    python benchmarks/convert_memory.py --layers 18 --dtype float32
    python benchmarks/convert_memory.py --task init --layers 36   # init-from-llm on a Qwen3-8B-like LLM
    python benchmarks/convert_memory.py --quick                  # tiny widths, smoke run
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine, print_table

sys.path.insert(0, os.path.join(ROOT, "tests"))

FIXTURES = Path(os.environ.get("NAVIL_FIXTURES", Path(ROOT).parent / "shared" / "fixtures"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_checkpoint(folder, config, shard_bytes, seed=0):
    """An original-layout checkpoint for `config` with random bf16 weights; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file

    from navil_hf.conversion.original import expected_original_shapes

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(current, str(folder / name), metadata={"format": "pt"})
        shards.append((name, list(current)))
        current, size = {}, 0

    for key, shape in expected_original_shapes(config).items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if current and size + nbytes > shard_bytes:
            flush()
        current[key] = tensor
        size, total = size + nbytes, total + nbytes
    flush()
    weight_map = {key: name for name, keys in shards for key in keys}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = FIXTURES / "original-qwen3-tiny" / "checkpoint"
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer / name, folder / name)
    return total


def build_llm(folder, layers, shard_bytes, quick=False, seed=0):
    """A Hugging Face Qwen3 folder at Qwen3-8B's widths (`layers` of 36) with random bf16 weights and the
    tests' tiny tokenizer (with a chat template); returns its size in bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from llm_sources import make_tokenizer

    widths = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128)  # fmt: skip
    if quick:
        widths = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16)  # fmt: skip
    config = Qwen3Config(num_hidden_layers=layers, tie_word_embeddings=False, max_position_embeddings=32768, **widths)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen3ForCausalLM(config).state_dict().items()}
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    shards, current, size, total = [], {}, 0, 0
    for key, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        if current and size + tensor.numel() * 2 > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size, total = size + tensor.numel() * 2, total + tensor.numel() * 2
    shards.append(current)
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return total


def measured(command):
    """(seconds, peak RSS, peak anonymous RSS (bytes), output) of `command` run as a child process; raises
    if it fails.

    The peak is the kernel's high-water mark of the child's resident set (`VmHWM` in /proc, read every
    0.1 s; it only grows, so the last reading before the exit is the peak up to 0.1 s before it):
    `ru_maxrss` would count the parent's memory copied at fork. It includes resident file pages (memory
    maps), which the kernel can reclaim; the largest `RssAnon` seen in the same readings is the memory
    the process really holds."""
    start = time.perf_counter()
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    peak = anonymous = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]) * 1024)
            anonymous = max(anonymous, int(status.split("RssAnon:")[1].split()[0]) * 1024)
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    log.seek(0)
    output = log.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output}")
    return seconds, peak, anonymous, output


def _size(text):
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4GB or 500MB") from None
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--task",
        choices=("convert", "init"),
        default="convert",
        help="convert: an original NaViL-9B-like checkpoint; init: init-from-llm on a Qwen3-8B-like LLM",
    )
    parser.add_argument("--layers", type=int, default=18, help="decoder layers (NaViL-9B and Qwen3-8B have 36)")
    parser.add_argument(
        "--shard-size",
        default="4GB",
        type=_size,
        help="shard size of the synthetic checkpoint and the output, e.g. 4GB",
    )
    parser.add_argument("--dtype", default="auto", help="output dtype (auto keeps bf16)")
    parser.add_argument("--workdir", default=None, help="where to build (default: a folder beside the repo)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and outputs")
    parser.add_argument("--quick", action="store_true", help="tiny widths (smoke run)")
    args = parser.parse_args(argv)

    from transformers.utils.hub import convert_file_size_to_int

    from tiny import full_size_original_config

    if args.quick:
        config = full_size_original_config(
            "qwen3", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512,
        )  # fmt: skip
        config["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       fullatt_block_indexes=[1])  # fmt: skip
        args.shard_size = "200KB"
    else:
        config = full_size_original_config("qwen3", num_hidden_layers=args.layers)
    work = Path(args.workdir or Path(ROOT).parent / "bench-convert-memory")
    shutil.rmtree(work, ignore_errors=True)
    source, copy, out = work / "source", work / "copy", work / "out"
    shard = convert_file_size_to_int(args.shard_size)
    try:
        start = time.perf_counter()
        if args.task == "convert":
            total = build_checkpoint(source, config, shard)
            command = ["convert", str(source), str(out), "--dtype", args.dtype]
            what = f"navil convert --dtype {args.dtype} (verified)"
            title = f"navil convert, {config['llm_config']['num_hidden_layers']} decoder layers at NaViL-9B widths"
        else:
            layers = 2 if args.quick else args.layers
            total = build_llm(source, layers, shard, quick=args.quick)
            preset = "tiny" if args.quick else "base"
            command = ["init-from-llm", str(source), str(out), "--vision-preset", preset, "--dtype", args.dtype]
            what = f"navil init-from-llm --vision-preset {preset} --dtype {args.dtype} (verified)"
            title = f"navil init-from-llm, {layers} decoder layers at Qwen3-8B widths"
        print(f"built {total / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s at {source}")
        copy_s, copy_rss, copy_anon, _ = measured(
            [sys.executable, "-c", f"import shutil; shutil.copytree({str(source)!r}, {str(copy)!r})"]
        )
        shutil.rmtree(copy)
        command = [sys.executable, "-m", "navil_hf", *command, "-q", "--max-shard-size", args.shard_size]
        seconds, rss, anon, output = measured(command)
        written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        print(output)
        print_table(
            f"{title} ({machine()})",
            ["step", "source GB", "shard GB", "written GB", "peak RSS GB", "peak anonymous GB", "seconds"],
            [
                [
                    "plain copy (shutil.copytree)",
                    total / 1e9,
                    shard / 1e9,
                    total / 1e9,
                    copy_rss / 1e9,
                    copy_anon / 1e9,
                    copy_s,
                ],
                [what, total / 1e9, shard / 1e9, written / 1e9, rss / 1e9, anon / 1e9, seconds],
            ],
        )
        print(f"\ntarget: peak RSS <= shard + 2 GB + one layer; ratio time / copy {seconds / copy_s:.1f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
