"""Training step (forward + backward + AdamW step, CPU float32, sdpa): packed vs padded batches, and the
routed NaViL vs a dense model of the same widths.

1. Packing. One batch of `--batch` chat-SFT-like samples (lengths: log-normal around 220 tokens plus a
   long tail up to ~2k, some with one multi-scale image; printed), collated by `PackedCollator` (one
   row, positions restart per sample, no padding) and by `PaddedCollator` (one row per sample, right-
   padded to the longest, attention mask). Same model, same samples: the losses must agree. Reported:
   real (non-pad) tokens per second of a whole step, and packed/padded. Also timed: one decoder layer's
   `text_packed_attention` forward + backward on the packed batch's segments, alone (x layers).
2. Routing. `NaViLForConditionalGeneration` (text only, visual experts) on rows where `--share` of the
   tokens go to the visual experts vs transformers' `Qwen3ForCausalLM` of the same widths: the dense
   model does the same FLOPs per token with one set of weights. The experts carry the dense weights,
   so the losses must agree and every dense gradient must equal the sum of its two experts'. Rows of
   equal length, no padding, so both run the same causal sdpa. Also timed: ours with every token on
   the text expert (`mm_token_type_ids` = 0: no sort, no gathers). Then every data movement routing
   adds is timed on its own at the batch's shapes (`routing_breakdown`), with a proposed replacement.

Each timed model and batch has its own AdamW (lr 1e-5, torch defaults). The machine is usually
shared: `--threads 1 --clock cpu` times this process's CPU time, which other processes disturb least.

    python benchmarks/train_step.py            # hidden 256, 4 layers, vocab 8192
    python benchmarks/train_step.py --quick    # tiny smoke run
"""

import argparse
import time

import numpy as np
import torch

import modeling_navil
from configuration_navil import NaViLConfig
from modeling_navil import ModalityRouting, NaViLForConditionalGeneration
from navil_hf.training.collate import IGNORE_INDEX, PackedCollator, PaddedCollator

from _common import (
    expert_state_dict,
    interleaved,
    machine,
    median,
    navil_text_config,
    print_table,
    text_model_pair,
    verdict,
    visual_mask,
)

PACKING_TARGET = 1.5  # packed / padded real tokens per second, at least
ROUTING_TARGET = 1.05  # routed / dense step time, at most
PAD = 0
SPECIAL = 12  # the last 12 ids of the vocabulary are NaViL's special tokens (as in `_common.text_model_pair`)


def llm_dims(hidden: int) -> dict:
    """Qwen3-style widths: head_dim 64, 4 query heads per KV head pair, FFN 3x."""
    heads = max(2, hidden // 64)
    return dict(
        hidden_size=hidden, intermediate_size=3 * hidden, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), head_dim=64,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# One training step, timed in parts
# ----------------------------------------------------------------------------------------------


class Stepper:
    """`step()`: zero_grad, forward (loss), backward, optimizer step; keeps each part's seconds."""

    clock = time.perf_counter  # `--clock cpu`: time.process_time

    def __init__(self, model, batch):
        self.model, self.batch = model, batch
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        self.parts = {"forward": [], "backward": [], "optimizer": []}

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        t0 = self.clock()
        loss = self.model(**self.batch, use_cache=False).loss
        t1 = self.clock()
        loss.backward()
        t2 = self.clock()
        self.optimizer.step()
        t3 = self.clock()
        for name, seconds in zip(self.parts, (t1 - t0, t2 - t1, t3 - t2)):
            self.parts[name].append(seconds)
        return loss.detach()

    def medians(self, skip: int) -> dict:
        return {name: median(v[skip:]) for name, v in self.parts.items()}


# ----------------------------------------------------------------------------------------------
# 1. Packed vs padded
# ----------------------------------------------------------------------------------------------


def packing_model(hidden: int, layers: int, vocab: int, quick: bool):
    """A NaViL with a small ViT (hidden 192, 2 layers, the last full attention; 64 / 3 layers in --quick)."""
    special = list(range(vocab - SPECIAL, vocab))
    text = navil_text_config(llm_dims(hidden), layers, vocab, 4096).to_dict()
    vision = dict(
        hidden_size=64 if quick else 192, intermediate_size=128 if quick else 768, num_hidden_layers=2,
        num_attention_heads=2 if quick else 3, fullatt_block_indexes=[1], window_size=8,
    )  # fmt: skip
    config = NaViLConfig(
        vision_config=vision, text_config=text, special_token_ids=special, image_token_id=special[2],
        image_start_token_id=special[4], image_end_token_id=special[3],
        image_line_break_token_id=special[10], image_frame_break_token_id=special[11],
    )  # fmt: skip
    torch.manual_seed(0)
    model = NaViLForConditionalGeneration(config).train()
    model.set_attn_implementation("sdpa")
    return model


# Images on some samples: one image each, at the scales (patch grids) of NaViL's multi-scale input.
IMAGES = {
    1: [(32, 32), (22, 22)],
    4: [(16, 16), (12, 12)],
    7: [(48, 32), (34, 22), (24, 16)],
    10: [(16, 16)],
    12: [(32, 24), (22, 16)],
}
QUICK_IMAGES = {1: [(8, 8), (4, 4)], 3: [(4, 8)]}


def sft_samples(config, batch: int, quick: bool, seed: int = 0) -> list[dict]:
    """`batch` samples like a chat SFT set's: 4 prompt tokens, an optional image, then text whose second
    half is the labelled answer. Text lengths: log-normal (median 220, sigma 0.6, clipped to 32-1200)
    for all but the last three, which are 900, 1400 and 2000 tokens (the long tail)."""
    rng = np.random.default_rng(seed)
    vocab = config.text_config.vocab_size
    if quick:
        lengths, images = rng.integers(8, 40, batch).tolist(), QUICK_IMAGES
    else:
        lengths = np.clip(rng.lognormal(np.log(220), 0.6, batch - 3), 32, 1200).astype(int).tolist()
        lengths, images = lengths + [900, 1400, 2000], IMAGES
    ctx, start, end = config.image_token_id, config.image_start_token_id, config.image_end_token_id
    line, frame = config.image_line_break_token_id, config.image_frame_break_token_id
    samples = []
    for i, n_text in enumerate(lengths):
        ids, sample = rng.integers(0, vocab - SPECIAL, 4).tolist(), {}
        grids = images.get(i)
        if grids:
            ids.append(start)
            for h, w in grids:
                ids += ([ctx] * (w // 2) + [line]) * (h // 2) + [frame]
            ids.append(end)
            patches = sum(h * w for h, w in grids)
            sample["pixel_values"] = torch.randn(patches, 3, 16, 16, generator=torch.Generator().manual_seed(i))
            sample["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in grids])
            sample["num_scales"] = torch.tensor([len(grids)])
        ids = torch.tensor(ids + rng.integers(0, vocab - SPECIAL, n_text).tolist())
        labels = ids.clone()
        labels[: len(ids) - max(1, n_text // 2)] = IGNORE_INDEX
        mm = ((ids == ctx) | (ids == start)).long()
        samples.append({**sample, "input_ids": ids, "labels": labels, "mm_token_type_ids": mm})
    return samples


def packed_attention_breakdown(args, position_ids: torch.Tensor, dims: dict, repeats: int) -> tuple[float, int]:
    """Forward + backward of one decoder layer's `text_packed_attention` on the packed batch (its segments,
    sdpa), alone: (median ms per step x layers, number of length groups)."""
    total = position_ids.shape[1]
    segments = modeling_navil.packed_segments(position_ids, 1, total)
    heads, kv_heads, dim = dims["num_attention_heads"], dims["num_key_value_heads"], dims["head_dim"]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, n, total, dim, generator=generator, requires_grad=True) for n in (heads, kv_heads, kv_heads)
    )
    grad = torch.randn(1, total, heads, dim, generator=generator)

    times = []
    for turn in range(repeats + 1):  # the first is a warm-up
        for t in (q, k, v):
            t.grad = None
        start = Stepper.clock()
        out = modeling_navil.text_packed_attention("sdpa", q, k, v, segments, dim**-0.5)
        out.backward(grad)
        if turn:
            times.append(Stepper.clock() - start)
    return median(times) * 1e3 * args.layers, len(segments.groups)


def run_packing(args):
    model = packing_model(args.hidden, args.layers, args.vocab, args.quick)
    samples = sft_samples(model.config, args.batch, args.quick)
    lengths = [len(s["input_ids"]) for s in samples]
    real, width = sum(lengths), max(lengths)
    visual = sum(int(s["mm_token_type_ids"].sum()) for s in samples)
    patches = sum(len(s["pixel_values"]) for s in samples if "pixel_values" in s)
    packed, padded = PackedCollator()(samples), PaddedCollator(PAD)(samples)

    with torch.no_grad():
        losses = [model(**b, use_cache=False).loss.item() for b in (packed, padded)]
    loss_diff = abs(losses[0] - losses[1]) / abs(losses[1])
    assert loss_diff < 1e-5, f"packed and padded losses differ: {losses}"

    steppers = {"packed": Stepper(model, packed), "padded": Stepper(model, padded)}
    interleaved({k: s.step for k, s in steppers.items()}, repeats=args.repeats, warmup=args.warmup)
    t = {k: s.medians(args.warmup) for k, s in steppers.items()}
    total = {k: sum(v.values()) for k, v in t.items()}
    rate = {k: real / v for k, v in total.items()}
    ratio = rate["packed"] / rate["padded"]
    ratios = {k: rate[k] / rate["padded"] for k in steppers}

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\nmodel: NaViL, LLM {llm_dims(args.hidden)}, {args.layers} layers, vocab {args.vocab}, visual experts; "
        f"ViT {model.config.vision_config.hidden_size} wide, 2 layers; {n_params / 1e6:.1f} M parameters"
    )
    print(f"samples ({len(samples)}): lengths {lengths}")
    print(
        f"real tokens {real} ({visual} visual), {sum('pixel_values' in s for s in samples)} samples with an image "
        f"({patches} patches); padded {len(samples)} x {width} = {len(samples) * width} "
        f"({real / (len(samples) * width):.0%} real); losses {losses[0]:.6f} / {losses[1]:.6f}"
    )
    rows = [
        [name, f"1 x {real}" if name.startswith("packed") else f"{len(samples)} x {width}", t[name]["forward"] * 1e3,
         t[name]["backward"] * 1e3, t[name]["optimizer"] * 1e3, total[name] * 1e3, f"{rate[name]:.0f}",
         f"{ratios[name]:.2f}"]
        for name in steppers
    ]  # fmt: skip
    print_table(
        f"Training step, packed vs padded (medians of {args.repeats} interleaved steps)",
        ["batch", "rows x width", "forward ms", "backward ms", "optimizer ms", "step ms", "real tokens/s", "/ padded"],
        rows,
    )
    print_table(
        f"Packed / padded real tokens/s (target >= {PACKING_TARGET})",
        ["packed tokens/s", "padded tokens/s", "ratio", "loss rel. diff", "target"],
        [[f"{rate['packed']:.0f}", f"{rate['padded']:.0f}", f"{ratio:.2f}", f"{loss_diff:.1e}",
          verdict(ratio, PACKING_TARGET, higher_is_better=True)]],
    )  # fmt: skip
    attention, groups = packed_attention_breakdown(
        args, packed["position_ids"], llm_dims(args.hidden), 3 if args.quick else 11
    )
    print(
        f"text_packed_attention forward + backward, {args.layers} layers, {len(samples)} segments in {groups} "
        f"length groups: {attention:.0f} ms ({attention / 1e3 / total['packed']:.1%} of the packed step)"
    )
    return ratio >= PACKING_TARGET


# ----------------------------------------------------------------------------------------------
# 2. Routed vs dense
# ----------------------------------------------------------------------------------------------


class _PermuteRows(torch.autograd.Function):
    """`x.index_select(0, order)` for a permutation whose inverse is known; backward: the inverse gather
    (index_select's backward is zeros + `index_add_`, a scatter)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _AddHalves(torch.autograd.Function):
    """`residual + torch.cat([a, b])` written straight into one output (`ModalityRouting.apply_add` does
    this with `out=` when gradients are off); backward: the gradient and its two row ranges (views)."""

    @staticmethod
    def forward(ctx, residual, a, b):
        ctx.n = len(a)
        out = torch.empty_like(residual)
        torch.add(residual[: ctx.n], a, out=out[: ctx.n])
        torch.add(residual[ctx.n :], b, out=out[ctx.n :])
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, grad[: ctx.n], grad[ctx.n :]


def routing_batch(rows: int, length: int, share: float, vocab: int, seed: int = 0) -> dict:
    """`rows` unpadded rows of `length` tokens, `share` of each row visual in 1, 2 or 3 image blocks."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab - SPECIAL, (rows, length), generator=generator)
    mm = torch.cat([visual_mask(length, share, 1 + r % 3) for r in range(rows)]).long()
    labels = input_ids.clone()
    labels[:, 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "mm_token_type_ids": mm, "labels": labels}


def _check_same_function(ours, dense, batch):
    """Loss equal; every dense gradient = the sum of the gradients of its text and visual experts."""
    ours.zero_grad(set_to_none=True)
    dense.zero_grad(set_to_none=True)
    loss_ours = ours(**batch, use_cache=False).loss
    loss_dense = dense(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"}, use_cache=False).loss
    loss_ours.backward()
    loss_dense.backward()
    grads = {name: p.grad for name, p in ours.named_parameters() if p.grad is not None}
    # The name map of `expert_state_dict`: dense key -> ours (text expert), plus the visual expert's key.
    mapped = expert_state_dict(
        {name: name for name, _ in dense.named_parameters()}, ("model.", "model.language_model.")
    )
    experts = {}
    for ours_name, dense_name in mapped.items():
        experts.setdefault(dense_name, []).append(ours_name)
    worst = 0.0
    for name, p in dense.named_parameters():
        summed = sum(grads[ours_name] for ours_name in experts[name])
        worst = max(worst, ((summed - p.grad).norm() / p.grad.norm().clamp_min(1e-30)).item())
    ours.zero_grad(set_to_none=True)
    dense.zero_grad(set_to_none=True)
    loss_diff = abs(loss_ours.item() - loss_dense.item())
    assert loss_diff < 1e-4 and worst < 1e-4, f"routed and dense differ: loss {loss_diff}, gradients {worst}"
    return loss_diff, worst


def run_routing(args):
    dims = llm_dims(args.hidden)
    ours, dense = text_model_pair(dims, args.layers, args.vocab, args.row_length)
    ours.train()
    dense.train()
    batch = routing_batch(args.rows, args.row_length, args.share, args.vocab)
    dense_batch = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    text_batch = {**batch, "mm_token_type_ids": torch.zeros_like(batch["mm_token_type_ids"])}
    loss_diff, grad_diff = _check_same_function(ours, dense, batch)

    steppers = {
        "dense": Stepper(dense, dense_batch),
        "routed": Stepper(ours, batch),
        "one expert": Stepper(ours, text_batch),
    }
    interleaved({k: s.step for k, s in steppers.items()}, repeats=args.repeats, warmup=args.warmup)
    t = {k: s.medians(args.warmup) for k, s in steppers.items()}
    total = {k: sum(v.values()) for k, v in t.items()}

    n_dense = sum(p.numel() for p in dense.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    visual = int(batch["mm_token_type_ids"].sum())
    print(
        f"\nmodels: {dims}, {args.layers} layers, vocab {args.vocab}; Qwen3ForCausalLM {n_dense / 1e6:.2f} M "
        f"parameters, NaViL {n_ours / 1e6:.2f} M (visual experts, 12-row special table, unused 1-layer ViT)"
    )
    print(
        f"batch: {args.rows} x {args.row_length} tokens, no padding, {visual} visual ({visual / batch['input_ids'].numel():.0%}, "
        f"1-3 image blocks per row); loss |diff| {loss_diff:.1e}, worst gradient rel. diff {grad_diff:.1e}"
    )
    rows = []
    for name in steppers:
        fb = t[name]["forward"] + t[name]["backward"]
        rows.append([
            name, t[name]["forward"] * 1e3, t[name]["backward"] * 1e3, t[name]["optimizer"] * 1e3,
            total[name] * 1e3, f"{total[name] / total['dense']:.3f}", f"{fb / (total['dense'] - t['dense']['optimizer']):.3f}",
        ])  # fmt: skip
    print_table(
        f"Training step, routed vs dense (medians of {args.repeats} interleaved steps)",
        ["model", "forward ms", "backward ms", "optimizer ms", "step ms", "step / dense", "fwd+bwd / dense"],
        rows,
    )
    ratio = total["routed"] / total["dense"]
    print_table(
        f"Routed / dense step time (target <= {ROUTING_TARGET})",
        ["dense ms", "routed ms", "ratio", "target"],
        [[total["dense"] * 1e3, total["routed"] * 1e3, f"{ratio:.3f}", verdict(ratio, ROUTING_TARGET)]],
    )
    extra = routing_breakdown(args, batch["mm_token_type_ids"].bool(), dims, repeats=5 if args.quick else 41)
    print(
        f"routing data movement: {extra['routed']:+.1f} ms per step ({extra['routed'] / 1e3 / total['routed']:.1%} of "
        f"the routed step); with the proposed changes {extra['proposed']:+.1f} ms"
    )
    return ratio <= ROUTING_TARGET


def routing_breakdown(args, mask: torch.Tensor, dims: dict, repeats: int = 41):
    """The data movement routing adds to a training step, forward + backward of each site at the batch's
    shapes, against what the dense model does there (nothing, or the plain residual add), and the
    proposed replacement. Every site is timed alone, its candidates interleaved, CPU clock of `--clock`."""
    routing = ModalityRouting(mask, both=True)
    total, n = routing.num_tokens, routing.num_text
    shape = tuple(mask.shape)
    h, q_dim, kv_dim = dims["hidden_size"], dims["num_attention_heads"] * 64, dims["num_key_value_heads"] * 64

    def leaf(*size):
        return torch.randn(*size, requires_grad=True)

    def backward(outputs, grads):
        torch.autograd.backward(outputs, grads)

    x, res, y = leaf(total, h), leaf(total, h), leaf(total, h)
    a, b = leaf(n, h), leaf(total - n, h)
    embeds, attn = leaf(*shape, h), leaf(*shape, q_dim)
    qkv_natural = [leaf(total, d) for d in (q_dim, kv_dim, kv_dim)]  # dense: one projection's output
    qkv_text = [leaf(n, d) for d in (q_dim, kv_dim, kv_dim)]
    qkv_visual = [leaf(total - n, d) for d in (q_dim, kv_dim, kv_dim)]
    g_text, g_visual, g_h = torch.randn(n, h), torch.randn(total - n, h), torch.randn(total, h)
    g_natural = [torch.randn(*shape, d) for d in (q_dim, kv_dim, kv_dim)]
    g_sorted_q = torch.randn(total, q_dim)
    dummy = torch.empty(total, 1)

    def merge(r):
        return r.apply_to_natural(dummy, lambda _: qkv_text, lambda _: qkv_visual, shape)

    def merge_permute(r):  # proposed: rows concatenated, one inverse-permutation gather per tensor
        return [
            _PermuteRows.apply(torch.cat(p), r.inverse, r.order).unflatten(0, shape) for p in zip(qkv_text, qkv_visual)
        ]

    def setup_and_ends(r_cls, permute):
        r = r_cls(mask, both=True)
        if permute:
            s = _PermuteRows.apply(embeds.flatten(0, 1), r.order, r.inverse)
            out = _PermuteRows.apply(s * 1.0, r.inverse, r.order).unflatten(0, shape)
        else:
            out = r.to_natural(r.to_sorted(embeds) * 1.0, shape)
        backward([out], [g_h.view(*shape, h)])

    # site: (calls per step, {candidate: fn}); the dense candidate is what Qwen3 does at that site
    sites = {
        "expert inputs x[:n], x[n:] (qkv, o_proj, FFN)": (3 * args.layers, {
            "dense": lambda: backward([x.view(total, h)], [g_h]),
            "routed": lambda: backward([x[:n], x[n:]], [g_text, g_visual]),
            "proposed": lambda: backward(list(x.split((n, total - n))), [g_text, g_visual]),
        }),
        "q, k, v to natural order (apply_to_natural)": (args.layers, {
            "dense": lambda: backward([t.unflatten(0, shape) for t in qkv_natural], g_natural),
            "routed": lambda: backward(merge(routing), g_natural),
            "proposed": lambda: backward(merge_permute(routing), g_natural),
        }),
        "attention output to routing order (to_sorted)": (args.layers, {
            "dense": lambda: backward([attn.flatten(0, 1)], [g_sorted_q]),
            "routed": lambda: backward([routing.to_sorted(attn)], [g_sorted_q]),
            "proposed": lambda: backward(
                [_PermuteRows.apply(attn.flatten(0, 1), routing.order, routing.inverse)], [g_sorted_q]
            ),
        }),
        "expert outputs joined + residual (apply cat, apply_add)": (2 * args.layers, {
            "dense": lambda: backward([res + y], [g_h]),
            "routed": lambda: backward([routing.apply_add(res, x, lambda _: a, lambda _: b)], [g_h]),
            "proposed": lambda: backward([_AddHalves.apply(res, a, b)], [g_h]),
        }),
        "sort + to_sorted / to_natural of the stream (once)": (1, {
            "dense": lambda: backward([(embeds.flatten(0, 1) * 1.0).unflatten(0, shape)], [g_h.view(*shape, h)]),
            "routed": lambda: setup_and_ends(ModalityRouting, False),
            "proposed": lambda: setup_and_ends(ModalityRouting, True),
        }),
    }  # fmt: skip
    leaves = [x, res, y, a, b, embeds, attn, *qkv_natural, *qkv_text, *qkv_visual]
    rows, sums = [], {"routed": 0.0, "proposed": 0.0}
    for site, (calls, candidates) in sites.items():
        times = {name: [] for name in candidates}
        for turn in range(repeats + 1):
            for name, fn in candidates.items():
                for t in leaves:
                    t.grad = None
                start = Stepper.clock()
                fn()
                if turn:
                    times[name].append(Stepper.clock() - start)
        m = {name: median(v) * 1e3 for name, v in times.items()}
        extra = {name: (m[name] - m["dense"]) * calls for name in sums}
        for name in sums:
            sums[name] += extra[name]
        rows.append(
            [
                site,
                calls,
                m["dense"],
                m["routed"],
                m["proposed"],
                f"{extra['routed']:+.1f}",
                f"{extra['proposed']:+.1f}",
            ]
        )
    rows.append(["total", "", "", "", "", f"{sums['routed']:+.1f}", f"{sums['proposed']:+.1f}"])
    print_table(
        f"Routing data movement per training step, forward + backward, {total} tokens (medians of {repeats})",
        ["site", "calls / step", "dense ms", "routed ms", "proposed ms", "routed extra ms / step",
         "proposed extra ms / step"],
        rows,
    )  # fmt: skip
    return sums


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("packing", "routing"), default=None)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16, help="samples of the packing batch")
    parser.add_argument("--rows", type=int, default=4, help="rows of the routing batch")
    parser.add_argument("--row-length", type=int, default=1024)
    parser.add_argument("--share", type=float, default=0.4, help="visual share of the routing batch")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="cpu: this process's CPU time (time.process_time), steadier on a busy machine with --threads 1",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny dims, one repeat, one thread (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.batch, args.rows, args.row_length = 64, 2, 512, 6, 2, 64
        args.repeats, args.warmup, args.threads = 1, 0, args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    Stepper.clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"machine: {machine()}; clock: {args.clock}")
    met = True
    if args.only in (None, "packing"):
        met &= run_packing(args)
    if args.only in (None, "routing"):
        met &= run_routing(args)
    return met


if __name__ == "__main__":
    main()
