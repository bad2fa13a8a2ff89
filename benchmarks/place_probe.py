"""Where do a trained NaViL's visual tokens know they lie? A linear probe per LLM layer.

For each Hub folder given, the images of a shapes dataset (`navil_hf.tasks.shapes`) run alone through the model
in the prompt's layout (`vision_stage._llm_image_states`), and a linear probe, fitted on the states of the first
`--train` images, predicts each image token's column, row and half of its row (`vision_stage.place_targets`)
from the connector's output and from the LLM's hidden state after each decoder layer; the table gives the
probes' accuracy on the next `--test` images. It tells whether the model's visual tokens carry where they lie
(the position questions need it), and at which layer:

    python benchmarks/place_probe.py learn-shapes/model-vision learn-shapes/run-all/model --data learn-shapes/shapes

(RESULTS.md §9: the through-LLM vision stage teaches the column at layer 1, and the LLM stage without the
place loss loses most of it.)
"""

import argparse
from pathlib import Path

import _common

PROBES = (("half", 6, 2), ("column", 4, 16), ("row", 5, 16))  # (name, target column, classes)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="NaViL Hub folders")
    parser.add_argument("--data", required=True, help="a shapes dataset folder (its train split is read)")
    parser.add_argument("--train", type=int, default=260, help="images whose states fit the probes")
    parser.add_argument("--test", type=int, default=100, help="images the probes are scored on")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of each probe (full batch)")
    parser.add_argument("--batch", type=int, default=20, help="images per forward")
    args = parser.parse_args(argv)
    if args.train < 1 or args.test < 1 or args.steps < 1 or args.batch < 1:
        parser.error("--train, --test, --steps and --batch must be positive")
    train_file = Path(args.data) / "train.jsonl"
    if not train_file.is_file():
        parser.error(f"--data: {args.data} has no train.jsonl")
    images = sum(1 for line in train_file.open(encoding="utf-8") if line.strip())
    if images < args.train + 1:
        parser.error(f"--data: {images} images, fewer than --train + 1")
    from navil_hf.research.accounting import load_config

    for path in args.models:
        try:
            load_config(path)
        except ValueError as e:
            parser.error(f"{path}: not a NaViL Hub folder ({e})")
    return args


def states(model, items, layers, batch):
    """(hidden states after `layers` decoder layers, or the connector's output for None; targets)."""
    import torch

    from navil_hf.tasks.vision_stage import _llm_image_states

    out, targets = [], []
    with torch.no_grad():
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            hidden, features = _llm_image_states(model, torch.cat([x[0] for x in chunk]),
                                                 torch.cat([x[1] for x in chunk]), chunk, layers or 0)  # fmt: skip
            out.append(features if layers is None else hidden)
            targets.append(torch.cat([x[2] for x in chunk]))
    return torch.cat(out), torch.cat(targets)


def probe_accuracy(train, test, column, classes, steps) -> float:
    """Held-out accuracy of a linear probe (standardised inputs, Adam, a little L2) for one target column."""
    import torch

    (x, t), (xt, tt) = train, test
    keep, keep_test = t[:, column] != -100, tt[:, column] != -100
    mean, std = x[keep].mean(0), x[keep].std(0) + 1e-5
    inputs, labels = (x[keep] - mean) / std, t[keep, column]
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(inputs), labels) + 1e-4 * linear.weight.square().sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = linear((xt[keep_test] - mean) / std).argmax(-1)
    return float((predicted == tt[keep_test, column]).float().mean())


def main(argv=None):
    args = parse_args(argv)
    import torch

    from navil_hf.tasks.vision_stage import encode_images
    from navil_hf.training.train import load_model, load_processor

    torch.set_num_threads(1)
    rows, results = [], {}
    for path in args.models:
        model, processor = load_model(path).float().eval(), load_processor(path)
        items = encode_images(processor, args.data, "train", model.config.vision_config, args.train + args.test)
        fit, score = items[: args.train], items[args.train :]
        for layers in [None, *range(model.config.text_config.num_hidden_layers + 1)]:
            train, test = states(model, fit, layers, args.batch), states(model, score, layers, args.batch)
            where = "connector" if layers is None else f"after layer {layers}"
            accuracy = {
                name: probe_accuracy(train, test, column, classes, args.steps) for name, column, classes in PROBES
            }
            results.setdefault(path, {})[where] = accuracy
            rows.append([path, where, *(f"{accuracy[name]:.3f}" for name, *_ in PROBES)])
            print(f"{path}, {where}: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()), flush=True)
    _common.print_table("Linear probes of each image token's place (held-out accuracy)",
                        ["model", "state", *(name for name, *_ in PROBES)], rows)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
