"""`navil chat "question"`: stream a converted NaViL's answer (one question, or an interactive multi-turn
chat), with a guard that stops an answer that loops."""

import json
import sys
from pathlib import Path

from ..errors import EXIT_OK, UsageError
from .arguments import add_dtype, non_negative_float, positive_int, probability

# The default answer length, and the repetition guard (an answer stops once a span of up to GUARD_MAX_SPAN
# tokens has repeated GUARD_REPEATS times in a row).
DEFAULT_ANSWER_TOKENS = 512
GUARD_MAX_SPAN, GUARD_REPEATS = 16, 4

HELP = "ask a converted NaViL model about images (streams the answer)"
DESCRIPTION = "Load a converted NaViL folder or Hub repo and stream its answer to one question."


def add_arguments(parser):
    parser.add_argument(
        "question",
        metavar="QUESTION",
        nargs="?",
        help="the question; `-` reads it from standard input; none starts an interactive multi-turn chat "
        "(an empty line or end of input ends it)",
    )
    parser.add_argument("--system", metavar="TEXT", default=None, help="a system message (default: the model's)")
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="sampling temperature; 0 (the default) is greedy decoding",
    )
    parser.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (with --temperature)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument(
        "--no-repetition-guard",
        action="store_true",
        help=f"do not stop an answer that loops (by default it stops once a span of up to "
        f"{GUARD_MAX_SPAN} tokens has repeated {GUARD_REPEATS} times in a row)",
    )
    parser.add_argument(
        "--model",
        metavar="PATH_OR_REPO",
        help="a NaViL folder or Hub repo id; without it, the demo model built from SmolLM2-135M-Instruct "
        "(needs the demo extra; its vision encoder is untrained)",
    )
    parser.add_argument(
        "--image", metavar="FILE", action="append", default=[], help="an image file; repeat for several images"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=DEFAULT_ANSWER_TOKENS,
        help=f"answer length limit (default {DEFAULT_ANSWER_TOKENS})",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_dtype(parser, help="weights dtype (auto: the checkpoint's)")


def check_model_reference(model):
    """A local folder must exist and hold config.json; anything else is taken as a Hub repo id."""
    from ..folders import CONFIG_FILE

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise UsageError(f"{model} has no config.json: not a converted NaViL folder")
        try:
            model_type = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise UsageError(f"{path / CONFIG_FILE} is not a JSON object: {e}") from None
        if model_type == "navil_chat":
            raise UsageError(
                f"{model} is an original NaViL checkpoint: convert it first (`navil convert {model} OUT_DIR`), "
                "then chat with --model OUT_DIR"
            )
        if model_type != "navil":
            raise UsageError(f"{model} holds a {model_type!r} model, not a converted NaViL folder (model_type navil)")
        return str(path)
    if path.exists():
        raise UsageError(f"{model} is not a folder")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UsageError(f"{model}: no such folder (and not a Hub repo id of the form OWNER/NAME)")
    return model


def run(args):
    question = args.question
    if question == "-":
        question = sys.stdin.read().strip()
    if question is not None and not question.strip():
        raise UsageError("the question is empty")
    for image in args.image:
        if not Path(image).is_file():
            raise UsageError(f"image file not found: {image}")
    if args.model:
        model_ref = check_model_reference(args.model)
    else:
        from ..demo import DEMO_NOTICE, ensure_demo_model

        model_ref = str(ensure_demo_model(progress=True))
        print(DEMO_NOTICE, file=sys.stderr)

    import torch
    from transformers import AutoModel, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the terminal for the answer
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # unknown device string, or a backend this torch lacks
        raise UsageError(f"cannot use --device {args.device!r}: {str(e).splitlines()[0]}") from None
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        model = AutoModel.from_pretrained(model_ref, trust_remote_code=True, dtype=dtype)
        processor = AutoProcessor.from_pretrained(model_ref, trust_remote_code=True)
    except (OSError, ValueError) as e:  # missing files, or a config that contradicts itself
        raise UsageError(f"cannot load {model_ref}: {str(e).splitlines()[0]}") from None
    model = model.to(device).eval()
    if device.type == "cpu" and model.dtype in (torch.float16,):
        model = model.float()  # float16 matmuls are slow or missing on CPU
    if args.seed is not None:
        torch.manual_seed(args.seed)

    session = ChatSession(model, processor, args)
    if question is not None:
        session.answer(question, list(args.image))
        return EXIT_OK
    images = list(args.image)  # the interactive chat's images belong to its first turn
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return EXIT_OK
        session.answer(line.strip(), images)
        images = []


class ChatSession:
    """One conversation: streams each answer, keeps the history, stops cleanly on Ctrl-C."""

    def __init__(self, model, processor, args):
        from transformers import StoppingCriteriaList

        self.model, self.processor, self.history = model, processor, []
        criteria = [] if args.no_repetition_guard else [RepetitionGuard()]
        self.generate_kwargs = dict(stopping_criteria=StoppingCriteriaList(criteria))
        self.generation_config = {"max_new_tokens": args.max_new_tokens}
        if args.temperature > 0:
            self.generation_config.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        self.system = args.system

    def answer(self, question, images):
        import torch

        printed, stream = False, None
        try:
            with torch.inference_mode():
                stream = self.model.chat(
                    self.processor,
                    question,
                    images=images or None,
                    history=self.history,
                    return_history=True,
                    generation_config=self.generation_config,
                    system_message=self.system,
                    stream=True,
                    **self.generate_kwargs,
                )
                for piece in stream:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    printed = True
        except KeyboardInterrupt:
            # The stream has stopped its generation thread and joined it: leaving now exits cleanly (130).
            sys.stdout.write("\n")
            raise
        except (ValueError, OSError) as e:  # unreadable image, prompt too long for the context, ...
            if printed:
                sys.stdout.write("\n")
            raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        sys.stdout.write("\n")
        self.history = getattr(stream, "history", None) or self.history


class RepetitionGuard:
    """Ends an answer that loops: once its last tokens are one span of 1..GUARD_MAX_SPAN tokens repeated
    GUARD_REPEATS times in a row. Greedy decoding is unchanged until then."""

    def __init__(self, max_span=GUARD_MAX_SPAN, repeats=GUARD_REPEATS):
        self.max_span, self.repeats = max_span, repeats

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, ids in enumerate(input_ids.tolist()):
            for span in range(1, self.max_span + 1):
                tail = ids[-span * self.repeats :]
                if len(tail) == span * self.repeats and tail == tail[:span] * self.repeats:
                    done[row] = True
                    break
        return done
