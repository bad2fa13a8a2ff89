"""Routed NaViL decoder layer vs transformers' dense `Qwen3DecoderLayer` of the same dims.

Both run CPU float32, batch 1, sdpa, under `torch.inference_mode()`, with position embeddings and
mask built as each model builds them. Our layer works on the routed (text-first) stream, as it does
inside `NaViLTextModel`; the per-forward routing setup (sort, `to_sorted`, `to_natural`) is timed
on its own, and "routed + setup" adds the two medians: the worst case, a one-layer model (an
N-layer model pays the setup once, not per layer). The visual experts get the dense weights, so
both layers compute the same function and the outputs are checked to agree before timing.

    python benchmarks/layer.py            # L=2048, hidden 1024, 8 heads / 4 KV, head_dim 128, FFN 3072
    python benchmarks/layer.py --quick    # tiny smoke run
"""

import argparse

import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

from compat_navil import create_causal_mask
from modeling_navil import ModalityRouting, NaViLDecoderLayer, NaViLRotaryEmbedding, _AttentionConfigView

from _common import (
    expert_state_dict,
    interleaved,
    machine,
    median,
    navil_text_config,
    print_table,
    qwen3_config,
    text_dims,
    verdict,
    visual_mask,
)  # fmt: skip

TARGET = 1.05


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny dims, L=64, one repeat, one thread (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.repeats, args.warmup, args.threads = 64, 1, 0, args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dims = text_dims(args.quick)
    length = args.length

    dense_config = qwen3_config(dims, 1, 1000, length)
    dense = Qwen3DecoderLayer(dense_config, layer_idx=0).eval()
    with torch.no_grad():  # norms away from 1 so a norm mix-up would show
        for name, p in dense.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ours_config = navil_text_config(dims, 1, 1000, length)
    ours = NaViLDecoderLayer(ours_config, 0).eval()
    ours.load_state_dict(expert_state_dict(dense.state_dict()))

    x = torch.randn(1, length, dims["hidden_size"])
    position_ids = torch.arange(length).unsqueeze(0)
    with torch.inference_mode():
        dense_pe = Qwen3RotaryEmbedding(dense_config)(x, position_ids)
        dense_mask = create_causal_mask(dense_config, x, None, None, position_ids)
        ours_pe = NaViLRotaryEmbedding(ours_config)(x, position_ids)
        ours_mask = create_causal_mask(_AttentionConfigView(ours_config, "sdpa"), x, None, None, position_ids)

    cases = [(0.0, 1), (0.5, 1), (0.5, 3), (0.75, 1), (0.75, 3), (1.0, 1)]
    rows, all_met = [], True
    for share, images in cases:
        mask = visual_mask(length, share, images)
        with torch.inference_mode():
            routing = ModalityRouting(mask)
            x_sorted = routing.to_sorted(x)

            def run_dense():
                return dense(x, attention_mask=dense_mask, position_ids=position_ids, position_embeddings=dense_pe)

            def run_layer():
                return ours(x_sorted, (1, length), routing, ours_pe, ours_mask)[0]

            def run_setup():
                r = ModalityRouting(mask)
                return r.to_natural(r.to_sorted(x), (1, length))

            def run_layer_setup():
                r = ModalityRouting(mask)
                h, _ = ours(r.to_sorted(x), (1, length), r, ours_pe, ours_mask)
                return r.to_natural(h, (1, length))

            diff = (run_layer_setup() - run_dense()).abs().max().item()
            assert diff < 1e-3, f"routed layer differs from the dense one by {diff}"
            times = interleaved(
                {"dense": run_dense, "layer": run_layer, "setup": run_setup}, repeats=args.repeats, warmup=args.warmup
            )
        t = {name: median(v) for name, v in times.items()}
        ratio, ratio_setup = t["layer"] / t["dense"], (t["layer"] + t["setup"]) / t["dense"]
        met = verdict(ratio, TARGET)
        all_met &= met == "met"
        layout = "-" if share in (0.0, 1.0) else ("1 block" if images == 1 else f"{images} images")
        rows.append([
            share, layout, t["dense"] * 1e3, t["layer"] * 1e3, t["setup"] * 1e3,
            f"{ratio:.3f}", f"{ratio_setup:.3f}", f"{diff:.1e}", met,
        ])  # fmt: skip

    print(f"machine: {machine()}")
    print(f"dims: {dims}, L={length}, float32, batch 1, sdpa, medians of {args.repeats} interleaved runs")
    print_table(
        f"Routed decoder layer vs Qwen3DecoderLayer (target: layer/dense <= {TARGET})",
        ["visual share", "layout", "Qwen3 layer ms", "routed layer ms", "routing setup ms",
         "routed/Qwen3", "(routed + setup)/Qwen3", "max |diff|", "target"],
        rows,
    )  # fmt: skip
    return all_met


if __name__ == "__main__":
    main()
