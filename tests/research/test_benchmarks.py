"""The benchmark scripts' --quick smoke runs: they run, and their equality checks hold (a routed
model must equal the dense one it is timed against, in training its gradients too; a packed batch's
loss must equal the padded batch's; the processor's pixel_values must equal the straightforward
pipeline's, the vision encoder builds no patches^2 tensor). No timing asserts."""

import importlib
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


def _script(name):
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module(name)


# What each quick run's report must show: the speed scripts' table with its target column; the vision
# script's verdict on the patches^2 tensor (it has no speed target).
REPORTED = {"vision": "-> no tensor of size patches^2"}


@pytest.mark.parametrize("name", ["layer", "text_model", "decode", "preprocess", "vision", "train_step"])
def test_quick_run(name, capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        _script(name).main(["--quick"])  # raises if an equality check fails
    finally:
        torch.set_num_threads(threads)  # quick runs use one thread
    assert REPORTED.get(name, "| target |") in capsys.readouterr().out


def test_convert_memory_quick_run(tmp_path, capsys):
    """The conversion memory benchmark builds a synthetic original checkpoint and converts it, verified."""
    _script("convert_memory").main(["--quick", "--workdir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert "navil convert --dtype auto (verified)" in out and "identical logits" in out
    _script("convert_memory").main(["--quick", "--task", "init", "--workdir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert "navil init-from-llm" in out and "identical logits" in out


def test_gpu_script_quick_runs_anywhere(capsys):
    """The GPU script's code paths (parity, measured peak, prefill FLOPs, decode) at tiny sizes on CPU."""
    _script("gpu").main(["--quick"])
    out = capsys.readouterr().out
    for row in ("matmul peak", "vision features", "logits", "prefill 256 tokens", "MFU", "decode batch 32"):
        assert row in out, row


def test_gpu_script_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: gpu.py would run the real measurements")
    with pytest.raises(SystemExit, match="no CUDA device"):
        _script("gpu").main([])


@pytest.mark.slow
def test_learn_shapes_quick_run(tmp_path, capsys, qwen3_folder):
    """The learning proof's recipe end to end for a few steps (the shapes task, `navil train`, held-out
    first-token curve, exact match through `batch_chat` of the saved folder) on a converted fixture."""
    from navil_hf.tasks.heldout import chat_answers
    from navil_hf.tasks.shapes import flat_score, read_jsonl, score
    from navil_hf.training.train import load_model, load_processor

    hub = qwen3_folder
    summary = _script("learn_shapes").main(["--quick", "--model", str(hub), "--workdir", str(tmp_path / "work")])
    assert [a["step"] for a in summary["accuracy"]] == [1, 3]
    # every curve point scores the whole held-out split, each kind in it; the answers are the trained folder's
    # greedy answers to the held-out questions in order (the untrained model's differ), and the exact match
    # reported is their score
    data = tmp_path / "work" / "shapes"
    test = read_jsonl(data / "test.jsonl")
    kinds = {f"acc_{r['kind']}" for r in test}
    assert all({k for k in a if k.startswith("acc_")} == kinds for a in summary["accuracy"])
    trained = load_model(summary["trained_model"])
    assert chat_answers(trained, load_processor(hub), test, data, batch=8) == summary["answers"]
    assert summary["exact_match"] == flat_score(score(summary["answers"], test))
    assert len(summary["answers"]) == 8 and isinstance(summary["bf16"], bool)
    assert summary["precision"].startswith("bf16: " if summary["bf16"] else "float32: ")
    # the curriculum: 1 step on color questions alone, then 2 on all kinds
    assert len(summary["curve"]) == 3 and (tmp_path / "work" / "run-all" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "run-color" / "model" / "model.safetensors").is_file()
    assert summary["first_stage"] == "color" and summary["scratch"] is None
    assert (tmp_path / "work" / "learning_curve.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "held-out first-token accuracy" in out and "held-out exact match" in out


@pytest.mark.slow
def test_learn_shapes_scratch_one_shape_stage(tmp_path, qwen3_folder):
    """`--scratch` trains a NaViL of that size built from scratch with --model's tokenizer (late fusion when it
    has ViT blocks), and `--first-stage one-shape` first trains on color and shape questions about one shape."""
    import json

    from navil_hf.tasks.shapes import read_jsonl

    work = tmp_path / "work"
    size = {"hidden": 32, "layers": 1, "vit_width": 32, "vit_layers": 1}
    summary = _script("learn_shapes").main(["--quick", "--model", str(qwen3_folder), "--workdir", str(work),
                                            "--scratch", json.dumps(size), "--first-stage", "one-shape"])  # fmt: skip
    config = json.loads((work / "model-scratch" / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 32 and config["vision_config"]["num_hidden_layers"] == 1
    assert summary["model"] == str(work / "model-scratch") and summary["scratch"] == size
    assert summary["description"] == "from scratch: LLM 32 wide x 1 layers, 1-block ViT 32 wide"
    first = list(read_jsonl(work / "shapes-one-shape" / "train.jsonl"))
    assert {r["kind"] for r in first} == {"color", "shape"} and all(len(r["shapes"]) == 1 for r in first)
    assert (work / "run-one-shape" / "model" / "model.safetensors").is_file()
    assert summary["first_stage"] == "one-shape" and summary["exact_match"]["accuracy"] >= 0
    for bad in ('{"hidden": 32}', '{"hidden": 32, "layers": 0, "vit_width": 32, "vit_layers": 1}', "[1]"):
        with pytest.raises(SystemExit) as exit_info:
            _script("learn_shapes").parse_args(["--scratch", bad])
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        _script("learn_shapes").parse_args(["--scratch", json.dumps(size), "--vision-preset", "none"])


def test_learn_shapes_targets():
    """The benchmark's bars: overall, each kind over its blind baseline, the mirrored position questions over
    the position bar (pooled over the axes), the minutes."""
    targets = _script("learn_shapes").targets
    bars = targets({"accuracy": 0.88, "acc_color": 1.0, "acc_position": 0.76}, {"color": 0.1, "position": 0.46},
                   {"left-right": {"n": 20, "original": 0.7, "mirrored": 0.3},
                    "top-bottom": {"n": 30, "original": 0.9, "mirrored": 0.9}}, 27 * 60)  # fmt: skip
    assert bars["exact match"] == {"value": 0.88, "bar": 0.85, "met": True}
    assert bars["color"]["met"] and bars["position"] == {"value": 0.76, "bar": 0.76, "met": True}
    assert bars["position, mirrored"] == {"value": 0.66, "bar": 0.76, "met": False}  # (20 x 0.3 + 30 x 0.9) / 50
    assert bars["minutes"] == {"value": 27.0, "bar": 30, "met": True}
    assert not targets({"accuracy": 0.8}, {}, {}, 31 * 60)["minutes"]["met"]


def test_learn_shapes_stages_arguments():
    """`--stages NAME:STEPS,...`: the curriculum's stages before the all-kinds one, in order; a stage that is
    unknown, twice, without a positive step count, or steps that leave none for the last stage: exit 2."""
    parse = _script("learn_shapes").parse_args
    args = parse(["--stages", "one-shape:200, shape:1500", "--steps", "2500"])
    assert args.stage_list == [("one-shape", 200), ("shape", 1500)] and args.color_steps == 1700
    assert parse([]).stage_list == [("color", 200)] and parse(["--color-steps", "0"]).stage_list == []
    assert parse(["--stages", "position:10,count:20"]).stage_list == [("position", 10), ("count", 20)]
    for bad in ("nope:10", "shape:0", "shape", "shape:x", "shape:10,shape:10", "shape:600"):
        with pytest.raises(SystemExit) as exit_info:
            parse(["--stages", bad, "--steps", "600"])
        assert exit_info.value.code == 2


@pytest.mark.slow
def test_learn_shapes_stages_run(tmp_path, qwen3_folder):
    """Each stage of `--stages` trains on its own data from the previous stage's model, then all kinds; with
    `--place-loss 1` (the auxiliary place term in every stage); a place layer out of range is exit 2."""
    from navil_hf.tasks.shapes import read_jsonl

    work = tmp_path / "work"
    summary = _script("learn_shapes").main(["--quick", "--model", str(qwen3_folder), "--workdir", str(work),
                                            "--stages", "one-shape:1,shape:1", "--steps", "3",
                                            "--place-loss", "1"])  # fmt: skip
    shape = list(read_jsonl(work / "shapes-shape" / "train.jsonl"))
    assert {r["kind"] for r in shape} == {"shape"} and max(len(r["shapes"]) for r in shape) > 1
    for stage in ("one-shape", "shape", "all"):
        assert (work / f"run-{stage}" / "model" / "model.safetensors").is_file()
    assert summary["stages"] == [("one-shape", 1), ("shape", 1)]
    assert summary["trained_model"] == str(work / "run-all" / "model")
    assert summary["place_loss"] == 1 and summary["place_weight"] == 1.0
    for argv in (["--place-loss", "0"], ["--place-loss", "99", "--workdir", str(tmp_path / "bad")]):
        with pytest.raises(SystemExit) as exit_info:
            main = _script("learn_shapes").parse_args if argv[1] == "0" else _script("learn_shapes").main
            main(["--quick", "--model", str(qwen3_folder), *argv])
        assert exit_info.value.code == 2


@pytest.mark.slow
def test_learn_shapes_vision_stage_run(tmp_path, qwen3_folder):
    """`--vision-steps`: the encoder and connector train alone first (`navil_hf.tasks.vision_stage`) into
    WORKDIR/model-vision, and the LLM stages start from that folder; `--questions 3`: the training records
    carry more turns, the test records one; a negative count is exit 2."""
    import json

    import torch

    from navil_hf.training.train import load_model

    work = tmp_path / "work"
    summary = _script("learn_shapes").main(["--quick", "--model", str(qwen3_folder), "--workdir", str(work),
                                            "--vision-steps", "2", "--questions", "3"])  # fmt: skip
    vision = summary["vision_stage"]
    assert vision["steps"] == 2 and vision["model_dir"] == str(work / "model-vision") == summary["model"]
    assert [point["step"] for point in vision["curve"]] == [1, 2] and vision["seconds"] <= summary["train_seconds"]
    before, after = load_model(qwen3_folder).state_dict(), load_model(work / "model-vision").state_dict()
    assert not torch.equal(before["model.connector.linear_1.weight"], after["model.connector.linear_1.weight"])
    from navil_hf.tasks.shapes import read_jsonl

    assert summary["questions"] == 3
    check = summary["position_check"]  # the held-out position questions, also on mirrored images
    assert check and set(check) <= {"left-right", "top-bottom"}
    assert sum(v["n"] for v in check.values()) == sum(
        r["kind"] == "position" for r in read_jsonl(work / "shapes" / "test.jsonl")
    )
    assert all(0 <= v["original"] <= 1 and 0 <= v["mirrored"] <= 1 for v in check.values())
    bars = summary["targets"]
    assert {"exact match", "minutes", "position, mirrored"} <= set(bars) and all(
        set(t) == {"value", "bar", "met"} for t in bars.values()
    )
    assert bars["exact match"]["bar"] == 0.85 and bars["minutes"]["met"] == (bars["minutes"]["value"] <= 30)
    for split, turns in (("train", {2, 3}), ("test", {1})):
        assert {len(r["messages"]) // 2 for r in read_jsonl(work / "shapes" / f"{split}.jsonl")} <= turns | {1}
    assert max(len(r["messages"]) for r in read_jsonl(work / "shapes" / "train.jsonl")) == 6
    config = json.loads((work / "run-color" / "model" / "config.json").read_text())
    assert config["model_type"] == "navil"
    with pytest.raises(SystemExit) as exit_info:
        _script("learn_shapes").parse_args(["--vision-steps", "-1"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        _script("learn_shapes").parse_args(["--questions", "0"])
    assert exit_info.value.code == 2


def test_training_compute_of_sweep_runs(tmp_path, qwen3_folder):
    """`sample_flops` is the mean of each sample's training FLOPs and prices the ViT; `add_compute` counts each
    stage's samples at its own price; `compute_winners` compares each variant's best loss within a budget."""
    import copy

    from navil_hf.research.accounting import count_flops, load_config
    from navil_hf.research.fusion_runs import add_compute, compute_winners, sample_flops
    from navil_hf.tasks.heldout import encode_records
    from navil_hf.tasks.shapes import make_shapes_dataset
    from navil_hf.training.train import load_processor

    make_shapes_dataset(tmp_path / "data", train=3, test=0, seed=2)
    samples = encode_records(load_processor(qwen3_folder), tmp_path / "data" / "train.jsonl")
    config = load_config(qwen3_folder)
    each = [sample_flops(config, [sample]) for sample in samples]
    assert sample_flops(config, samples) == pytest.approx(sum(each) / 3) and len(set(each)) > 1
    full = count_flops(config, grids=samples[0]["image_grid_thw"].tolist(), token_types=samples[0]["mm_token_type_ids"],
                       num_scales=samples[0]["num_scales"].tolist(), training=True)  # fmt: skip
    assert 0 < each[0] < full.total  # the LM head at the labelled positions only
    no_vit = copy.deepcopy(config)
    no_vit.vision_config.num_hidden_layers = 0
    bare = count_flops(no_vit, grids=samples[0]["image_grid_thw"].tolist(), token_types=samples[0]["mm_token_type_ids"],
                       num_scales=samples[0]["num_scales"].tolist(), training=True).by_component()  # fmt: skip
    vit = sum(full.by_component()[part] - bare[part] for part in ("vision", "vision_attention"))
    assert vit > 0 and each[0] - sample_flops(no_vit, samples[:1]) == pytest.approx(vit)  # nothing else changes
    with pytest.raises(ValueError, match="at least one"):
        sample_flops(config, [])

    run = {"name": "late-s-4", "variant": "late", "color_steps": 2,
           "rows": [{"samples": 4, "loss": 2.0}, {"samples": 8, "loss": 1.0}, {"samples": 16, "loss": 0.5}]}  # fmt: skip
    priced = add_compute(run, {"color": 10.0, "mixed": 100.0}, batch=4)
    assert [row["C"] for row in priced["rows"]] == [40.0, 80.0, 880.0]
    assert priced["compute"]["color"] == 80.0 and priced["compute"]["mixed"] == 800.0 == 880.0 - 80.0
    assert "C" not in run["rows"][0]  # the run given is left as it was

    def end(variant, name, total, loss):
        return {"variant": variant, "name": name, "compute": {"total": total}, "rows": [{"loss": loss}]}

    runs = [end("late", "a", 10, 1.0), end("early", "b", 20, 0.8), end("late", "c", 100, 0.5),
            end("early", "d", 100, 0.6)]  # fmt: skip
    winners = compute_winners(runs, points=3)
    assert [w["C"] for w in winners] == pytest.approx([10, 10**1.5, 100])
    assert [w["ahead"] for w in winners] == [None, "early", "late"]
    assert winners[1]["late"] == (1.0, "a") and winners[2]["early"] == (0.6, "d")


def test_fusion_sweep_budgets_arguments():
    """`--budgets`: one run per size, variant and budget (the shortest first), --color-steps + the budget steps
    each; with --steps, or a budget that is not a positive count, one usage line (exit 2)."""
    sweep = _script("fusion_sweep")
    args = sweep.parse_args(["--budgets", "400,100, 200"])
    assert args.budget_list == [100, 200, 400] and args.color_steps == sweep.BUDGET_COLOR_STEPS
    assert args.steps == sweep.BUDGET_COLOR_STEPS + 400
    assert sweep.parse_args([]).budget_list is None and sweep.parse_args([]).steps == sweep.STEPS
    for bad in (["--budgets", "0,100"], ["--budgets", "a"], ["--budgets", ","], ["--budgets", "100", "--steps", "50"]):
        with pytest.raises(SystemExit) as exit_info:
            sweep.parse_args(bad)
        assert exit_info.value.code == 2


def test_fusion_sweep_learning_rate_rules():
    """`--lr-scaling`: one rule for both variants or one per variant (sqrt where none is named); each rule
    scales --lr from LLM width 64; anything else is a usage error (exit 2)."""
    from navil_hf.research.fusion import SIZES, run_lr

    sweep = _script("fusion_sweep")
    assert sweep.parse_args([]).lr_rules == {"late": "sqrt", "early": "sqrt"}
    assert sweep.parse_args(["--lr-scaling", "linear"]).lr_rules == {"late": "linear", "early": "linear"}
    assert sweep.parse_args(["--lr-scaling", "late:linear"]).lr_rules == {"late": "linear", "early": "sqrt"}
    rules = sweep.parse_args(["--lr-scaling", "early:none, late:linear"]).lr_rules
    assert rules == {"late": "linear", "early": "none"}
    assert [run_lr(SIZES[s], 2e-3, "linear") for s in ("s", "m", "l")] == pytest.approx([2e-3, 1e-3, 2e-3 / 3])
    assert run_lr(SIZES["m"], 2e-3, "sqrt") == pytest.approx(2e-3 / 2**0.5) and run_lr(SIZES["l"], 2e-3, "none") == 2e-3
    with pytest.raises(ValueError, match="unknown learning-rate scaling"):
        run_lr(SIZES["s"], 2e-3, "cubic")
    for bad in ("cubic", "late:cubic", "middle:sqrt", ",", "late"):
        with pytest.raises(SystemExit) as exit_info:
            sweep.parse_args(["--lr-scaling", bad])
        assert exit_info.value.code == 2, bad


@pytest.mark.slow
def test_fusion_sweep_budgets_run(tmp_path, monkeypatch, qwen3_folder):
    """A `--budgets` sweep: a run per size and budget, each measured at the switch and at its end only, its
    mixed stage's learning rate annealed to 0 (cosine; the color stage's constant), and only the runs' ends
    fitted (one point per run in runs-early.csv, bootstrap over runs), at D = the mixed stage's tokens."""
    from navil_hf.research.scaling import read_runs
    from navil_hf.training import train as training

    schedules, real_train = [], training.train

    def recording(config, **kwargs):
        schedules.append((config.training["max_steps"], config.training["lr_scheduler_type"]))
        return real_train(config, **kwargs)

    monkeypatch.setattr(training, "train", recording)
    work = tmp_path / "work"
    summary = _script("fusion_sweep").main(["--quick", "--tokenizer", str(qwen3_folder), "--workdir", str(work),
                                            "--variants", "early", "--budgets", "2,3,4"])  # fmt: skip
    names = [r["name"] for r in summary["runs"]]
    assert names == [f"early-{size}-{b}" for size in ("xs", "s") for b in (2, 3, 4)]
    per_size = [stage for b in (2, 3, 4) for stage in ((2, "constant_with_warmup"), (b, "cosine"))]
    assert schedules == per_size * 2  # the color stage at a constant rate, the mixed stage annealed
    ends = []
    for run in summary["runs"]:
        assert [(p["step"], p["stage"]) for p in run["rows"]] == [(2, "color"), (2 + run["budget"], "mixed")]
        assert run["anneal"] and run["final"]
        switch, end = run["rows"]
        ends.append({**end, "D": end["D"] - switch["D"]})  # the mixed stage's tokens: the color stage is shared
    by_size = {size: [e["D"] for e in ends if e["size"] == size] for size in ("xs", "s")}
    assert all(D == sorted(D) and len(set(D)) == 3 for D in by_size.values())
    assert by_size["xs"] == by_size["s"]  # the same samples: the same tokens at every budget
    fitted = read_runs(work / "runs-early.csv")
    assert sorted(fitted.D) == sorted(e["D"] for e in ends) and sorted(fitted.loss) == sorted(e["loss"] for e in ends)
    assert summary["fits"]["early"]["objective"]["n_runs"] == 6
    assert summary["settings"]["budget_list"] == [2, 3, 4] and (work / "fusion_sweep.png").stat().st_size > 0


@pytest.mark.slow
def test_fusion_sweep_quick_run(tmp_path, capsys, monkeypatch, qwen3_folder):
    """The late- vs early-fusion sweep end to end for a few steps: tiny from-scratch models of both variants
    (the fixture's tokenizer; raster token order, the ViT's LayerScale at 0.1), the color-first curriculum
    (color-stage points in runs.csv, only the mixed stage's in the CSV files `navil scaling fit` reads, D
    counting both stages' tokens), per-size learning rates, the comparison plot, per variant a fit that runs
    or says why it cannot; then a sweep stopped in its last run: runs.csv and the finished runs' result.json
    are on disk, `--refit` fits them with the stopped run marked unfinished, `--resume` trains only that run."""
    import csv
    import json
    import math

    from navil_hf.conversion.init_llm import VISION_LAYER_SCALE
    from navil_hf.research import fusion
    from navil_hf.research.fusion_runs import fit_variant, write_csv
    from navil_hf.research.scaling import read_runs
    from navil_hf.tasks.shapes import read_jsonl

    sweep = _script("fusion_sweep")
    hub = qwen3_folder
    work = tmp_path / "work"
    quick = ["--quick", "--tokenizer", str(hub), "--workdir", str(work)]
    summary = sweep.main(quick)
    with open(work / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"late", "early"} and len({r["name"] for r in rows}) == 4
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    points = fusion.eval_steps(6, 3, 0, color_steps=2, color_evals=2)
    assert points == {1: "color", 2: "color", 3: "mixed", 4: "mixed", 6: "mixed"}
    scored_kinds = {f"acc_{r['kind']}" for r in read_jsonl(work / "shapes" / "test.jsonl")[:8]}  # --acc-records
    for run in summary["runs"]:
        assert [(p["step"], p["stage"]) for p in run["rows"]] == list(points.items())
        tokens = [row["D"] for row in run["rows"]]
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens) and tokens[0] > 0
        assert tokens[-1] == run["tokens"]  # both stages' tokens
        assert set(run["final"]) == {"accuracy"} | scored_kinds and "acc_color" in run["after_color"]
        config = json.loads((work / "runs" / run["name"] / "model" / "config.json").read_text())["vision_config"]
        assert config["token_order"] == "raster" and config["initializer_factor"] == VISION_LAYER_SCALE
        assert (work / "runs" / run["name"] / "color" / "model" / "config.json").is_file()
        priced = [{k: v for k, v in row.items() if k != "C"} for row in run["rows"]]  # C: added from the FLOPs
        assert json.loads((work / "runs" / run["name"] / "result.json").read_text())["rows"] == priced
    late, early = (
        {r["size_name"]: r["params"]["N"] for r in summary["runs"] if r["variant"] == v} for v in ("late", "early")
    )
    assert all(late[size] > early[size] for size in late)  # the ViT blocks
    # late and early: the same samples, so the same tokens at every point; lr x sqrt(64 / hidden)
    by_name = {r["name"]: r for r in summary["runs"]}
    for size, hidden in (("xs", 32), ("s", 64)):
        assert [p["D"] for p in by_name[f"late-{size}"]["rows"]] == [p["D"] for p in by_name[f"early-{size}"]["rows"]]
        expected = pytest.approx(2e-3 * (64 / hidden) ** 0.5)
        assert by_name[f"late-{size}"]["lr"] == by_name[f"early-{size}"]["lr"] == expected
    for variant in ("late", "early"):
        runs = read_runs(work / f"runs-{variant}.csv")
        assert len(runs) == sum(r["variant"] == variant and r["stage"] == "mixed" for r in rows) == 6
        # six points: the fit runs (and says why it cannot with fewer, below)
        fit = summary["fits"][variant]
        assert "skipped" not in fit and fit["objective"]["n_runs"] == 6 and (work / f"fit-{variant}.png").is_file()
    write_csv(tmp_path / "few.csv", [r for r in summary["runs"][0]["rows"] if r["stage"] == "mixed"])
    assert fit_variant(tmp_path / "few.csv", 10, 0) == (None, {"skipped": f"no fit: {tmp_path / 'few.csv'}: 3 "
                                                               "runs; the 5-parameter fit needs at least 5"})  # fmt: skip
    assert (work / "fusion_sweep.png").stat().st_size > 0 and (work / "results.json").is_file()
    for size in ("xs", "s"):  # the same samples: the ViT's FLOPs are the difference
        late_c, early_c = by_name[f"late-{size}"]["compute"], by_name[f"early-{size}"]["compute"]
        assert late_c["total"] > early_c["total"] > 0 and late_c["per_sample"]["color"] > 0
        assert [p["C"] for p in by_name[f"late-{size}"]["rows"]][-1] == late_c["total"]
    assert summary["compute_winners"] and all(w["ahead"] in ("late", "early", None) for w in summary["compute_winners"])
    out = capsys.readouterr().out
    assert "sweep ETA" in out and "Which fusion is ahead at a training compute" in out

    # A sweep stopped in its last run (early-s), at its final accuracy: what it finished stays on disk.
    measure, calls = fusion.exact_match, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # 4 runs x (end of the color stage, end)
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(fusion, "exact_match", stopping)
    with pytest.raises(KeyboardInterrupt):
        sweep.main([*quick[:-1], str(stopped)])
    monkeypatch.setattr(fusion, "exact_match", measure)
    assert not (stopped / "runs.json").exists() and not (stopped / "runs" / "early-s" / "result.json").exists()
    with open(stopped / "runs.csv", newline="") as f:
        partial = list(csv.DictReader(f))
    assert [r["step"] for r in partial if r["name"] == "early-s"] == ["1", "2", "3", "4"]
    assert len(partial) == 3 * 5 + 4
    refit = sweep.main([*quick[:-1], str(stopped), "--refit"])
    assert refit["unfinished"] == ["early-s"] and len(refit["runs"]) == 4
    assert [r["name"] for r in refit["runs"] if r["final"]] == ["late-xs", "early-xs", "late-s"]
    assert len(read_runs(stopped / "runs-early.csv")) == 3 + 2  # early-s's mixed points so far are fitted too
    assert "not finished: early-s" in capsys.readouterr().out
    resumed = sweep.main([*quick[:-1], str(stopped), "--resume"])
    out = capsys.readouterr().out
    assert "1 runs (early-s)" in out and "3 finished already" in out
    assert not resumed["unfinished"] and all(r["final"] for r in resumed["runs"])
    assert [p["D"] for r in resumed["runs"] for p in r["rows"]] == [p["D"] for r in summary["runs"] for p in r["rows"]]


def test_place_probe_run(tmp_path, capsys, qwen3_folder):
    """`place_probe.py`: a probe accuracy per place target at the connector and after each decoder layer; a
    folder that is not a NaViL, a dataset too small or none is a usage error (exit 2) before any loading."""
    from navil_hf.research.accounting import load_config
    from navil_hf.tasks.shapes import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", train=6, test=0, seed=3)
    probe = _script("place_probe")
    results = probe.main([str(qwen3_folder), "--data", str(tmp_path / "data"), "--train", "4", "--test", "2",
                          "--steps", "5", "--batch", "3"])  # fmt: skip
    layers = load_config(qwen3_folder).text_config.num_hidden_layers
    states = results[str(qwen3_folder)]
    assert list(states) == ["connector", *(f"after layer {i}" for i in range(layers + 1))]
    assert all(set(v) == {"half", "column", "row"} and all(0 <= a <= 1 for a in v.values()) for v in states.values())
    assert "Linear probes of each image token's place" in capsys.readouterr().out
    for argv in ([str(tmp_path), "--data", str(tmp_path / "data")],
                 [str(qwen3_folder), "--data", str(tmp_path / "data"), "--train", "6"],
                 [str(qwen3_folder), "--data", str(tmp_path)]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            probe.main(argv)
        assert exit_info.value.code == 2 and "error: " in capsys.readouterr().err.strip().splitlines()[-1]
