"""The training command as each process of a distributed test runs it (`torchrun ... distributed_train.py`):
`train(load_config(CONFIG, --set overrides))`, recording what the tests compare.

    python tests/distributed_train.py CONFIG RESULT.json [--resume] [--set key=value ...]

Every process writes `RESULT.rank<N>.json`: its rank and world size, the distribution the Trainer set up,
the per-step losses and gradient norms it logged (the same on every rank: the Trainer averages them over
the processes), and one entry per forward pass of its model (tokens, labelled tokens, samples, whether the
batch had images), so a test can see which process got which batch. FSDP runs on CPU processes through
`fsdp_on_cpu` (accelerate would quietly train them DDP).
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import TrainerCallback

from navil_hf.training.train import load_config, train


def fsdp_on_cpu():
    """accelerate (1.15) makes a run FSDP only on accelerators: on CPU processes (MULTI_CPU) it drops the
    FSDP plugin the Trainer passes and trains DDP instead, silently. Here CPU processes given the plugin
    are made FSDP, as the same plugin makes GPU processes; everything after this switch (fully_shard,
    DTensor optimizer states, gathered and sharded checkpoints) is accelerate's FSDP2 code as on GPUs."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.fsdp_plugin = fsdp_plugin
            # Both shared states, as accelerate does for FSDP (every AcceleratorState() copies PartialState's).
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


class Recorder(TrainerCallback):
    def __init__(self):
        self.record = {"losses": [], "grad_norms": [], "steps": [], "batches": []}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from torch.distributed.fsdp import FSDPModule

        self.record.update(
            rank=args.process_index,
            world_size=args.world_size,
            parallel_mode=str(args.parallel_mode),
            device=str(args.device),
            fsdp_units=sorted({type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)}),
            optimizer=type(getattr(optimizer, "optimizer", optimizer)).__name__,
            start_step=state.global_step,
        )
        model.register_forward_pre_hook(self._forward, with_kwargs=True)

    def _forward(self, module, args, kwargs):
        if module.training:
            labels, positions = kwargs["labels"], kwargs.get("position_ids")
            self.record["batches"].append(
                {
                    "tokens": int(labels.numel()),
                    "labelled": int((labels[..., 1:] != -100).sum()),
                    "samples": int((positions == 0).sum()) if positions is not None else int(labels.shape[0]),
                    "images": kwargs.get("pixel_values") is not None,
                }
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.record["steps"].append(state.global_step)
            self.record["losses"].append(float(logs["loss"]))
            self.record["grad_norms"].append(float(logs["grad_norm"]))

    def on_train_end(self, args, state, control, **kwargs):
        self.record["global_step"] = state.global_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("result")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    options = parser.parse_args()
    fsdp_on_cpu()
    recorder = Recorder()
    config = load_config(options.config, options.overrides)
    result = train(config, resume=options.resume, force=True, callbacks=[recorder])
    recorder.record["model_dir"] = str(result.model_dir)
    rank = recorder.record.get("rank", int(os.environ.get("RANK", "0")))
    Path(f"{options.result}.rank{rank}.json").write_text(json.dumps(recorder.record, indent=1))


if __name__ == "__main__":
    main()
