"""The `ladderlm` command: prepare, train, sample, eval, bench, plot."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import LadderError, TrainingInterrupted


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that states each option's default, where it has one worth stating."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if not action.help or default is None or default is False or default == [] or default == argparse.SUPPRESS:
            return action.help
        return f"{action.help} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"formatter_class": DefaultsHelpFormatter, **kwargs})

    def error(self, message: str):  # one line, not usage + message
        command = self.prog.removeprefix("ladderlm").strip()  # main prints "ladderlm: error: "
        raise LadderError(f"{command}: {message}" if command else message)


def cmd_prepare(args: argparse.Namespace) -> None:
    from .data import prepare

    if args.vocab_size is not None and args.tokenizer != "bpe":
        raise LadderError("--vocab-size sizes a BPE vocabulary; a char tokenizer takes every character of the corpus")
    meta = prepare(args.source, args.tokenizer, Path(args.out), 512 if args.vocab_size is None else args.vocab_size)
    print(f"prepared {args.out}: {meta['train_tokens']} train / {meta['val_tokens']} val tokens, vocab {meta['vocab_size']}")


def cmd_train(args: argparse.Namespace) -> None:
    from . import checkpoint
    from .config import apply_overrides, load_config, validate
    from .train import Run, train

    if args.resume:
        if args.preset or args.config:
            raise LadderError("--resume continues the run's own config; use --set to change keys")
        run = Run(Path(args.out))
        if not (run.ckpt.is_dir() or run.ckpt.with_name("ckpt.old").is_dir()):  # .old: a crash inside a checkpoint write
            if run.began():
                raise LadderError(f"nothing to resume: {run.out} stopped before its first checkpoint; remove it and start again")
            raise LadderError(f"nothing to resume: {run.ckpt} does not exist")
        _, cfg, _ = checkpoint.load(args.out)
        cfg = validate(apply_overrides(cfg, args.set))
    else:
        cfg = load_config(args.preset, args.config, args.set)
    losses = train(cfg, args.data, args.out, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        print(
            f"done: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f} "
            "(estimates; `ladderlm eval` scores the whole split)"
        )


def _prompt_text(prompt: str, what: str = "the prompt") -> str:
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise LadderError(f"{what} is not valid UTF-8") from None
    return prompt


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of a streamed text not to print yet: the start of a multi-byte
    character and, before it, of a stop string that the next tokens may complete (printed text
    stays printed)."""
    broken = len(text) - len(text.rstrip("\ufffd"))  # the bytes so far of a character the next tokens complete
    head = text[: len(text) - broken]  # a stop string may start before that character and end with it
    return broken + max((k for stop in stops for k in range(1, len(stop)) if head.endswith(stop[:k])), default=0)


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from . import checkpoint
    from .distributed import resolve_device
    from .sampling import generate

    prompts = [_prompt_text(p) for p in (args.prompt or [""])]
    for name, ok in (
        ("--max-new-tokens", args.max_new_tokens >= 0),
        ("--num-samples", args.num_samples >= 1),
        ("--temperature", 0 <= args.temperature < float("inf")),
        ("--top-k", args.top_k is None or args.top_k >= 1),
        ("--top-p", args.top_p is None or 0 < args.top_p <= 1),
        ("--seed", 0 <= args.seed < 2**63),
    ):
        if not ok:
            raise LadderError(f"{name} is out of range")
    if len(prompts) * args.num_samples * max(1, args.max_new_tokens) >= 2**56:  # past 2**60 torch cannot even size the tokens
        raise LadderError("--max-new-tokens x --num-samples x prompts is out of range")
    if not all(args.stop):
        raise LadderError("--stop must not be empty")
    for stop in args.stop:  # checked up front, not where its bytes are first counted
        _prompt_text(stop, "a --stop string")
    if args.stream and len(prompts) * args.num_samples != 1:
        raise LadderError("--stream prints one sample; give one --prompt and --num-samples 1")
    model, _, tokenizer = checkpoint.load(args.ckpt, resolve_device(args.device, "--device"), args.set)
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    window = model.cfg.block_size - 1  # tokens after the start token
    if args.no_slide and max(map(len, prompt_ids)) > window:
        raise LadderError(f"a prompt has {max(map(len, prompt_ids))} tokens but the window holds {window}; drop --no-slide")
    rows = [p for p in prompts for _ in range(args.num_samples)]
    on_token = None
    if args.stream or args.stop:  # needs each row's text as it grows: one host sync per token
        emitted: list[list[int]] = [[] for _ in rows]
        shown = [0]
        if args.stream:
            sys.stdout.write(rows[0])

        finished = [False] * len(rows)
        # A new stop string ends in the newest token: the last tokens covering its bytes (a token is
        # at least one byte), and a character cut in two before them, are enough to find it.
        reach = max((len(stop.encode()) for stop in args.stop), default=0) + 4

        def on_token(token: torch.Tensor) -> torch.Tensor:
            for r, t in enumerate(token.tolist()):
                if finished[r] or t == tokenizer.eot_id:
                    finished[r] = True
                    continue
                emitted[r].append(t)
                finished[r] = cut_at_stop(tokenizer.decode(emitted[r][-reach:]), args.stop)[1]
            if args.stream:
                text = cut_at_stop(streamed_text(), args.stop)[0]
                show(text[: len(text) - held_back(text, args.stop)])
            return torch.tensor(finished, device=token.device)

        settled: list = [0, ""]  # row 0's first tokens, ending on a character boundary, and their text

        def streamed_text() -> str:
            """Row 0's text so far, decoding only its unsettled tokens: one token costs O(reach), not O(length)."""
            ids, (k, text) = emitted[0], settled
            if len(ids) - k > 2 * reach:
                head = tokenizer.decode(ids[k : len(ids) - reach])
                if not head.endswith("\ufffd"):  # a whole character last: the tokens after it decode on their own
                    k, text = len(ids) - reach, text + head
                    settled[:] = k, text
            return text + tokenizer.decode(ids[k:])

        def show(text: str) -> None:  # text only grows past what is shown: held-back characters are never shown early
            if len(text) > shown[0]:
                sys.stdout.write(text[shown[0] :])
                sys.stdout.flush()
                shown[0] = len(text)

    out = generate(
        model,
        prompt_ids,
        tokenizer.eot_id,
        args.max_new_tokens,
        args.num_samples,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        on_token,
        slide=not args.no_slide,
    )
    if args.stream:
        show(cut_at_stop(streamed_text(), args.stop)[0])  # what was held back, if the sample ended there
        print()
        return
    for i, (prompt, ids) in enumerate(zip(rows, out)):
        if i:
            print("\n---")
        print(prompt + cut_at_stop(tokenizer.decode(ids), args.stop)[0])


def cmd_eval(args: argparse.Namespace) -> None:
    from . import checkpoint
    from .config import json_line, write_whole
    from .data import TokenData
    from .distributed import resolve_device
    from .evaluate import evaluate, sample_quality

    if args.rows < 1 or args.batch_size < 1:
        raise LadderError("--rows and --batch-size must be >= 1")
    if args.samples < 0 or args.sample_length < 8:
        raise LadderError("--samples must be >= 0 and --sample-length >= 8")
    if not 0 <= args.seed < 2**63:
        raise LadderError("--seed is out of range")
    if args.samples * args.sample_length >= 2**56:  # past 2**61 torch cannot even size the samples' NLLs
        raise LadderError("--samples x --sample-length is out of range")
    if args.scorer and not args.samples:
        raise LadderError("--scorer scores generated samples; give --samples N too")
    device = resolve_device(args.device, "--device")
    model, cfg, tokenizer = checkpoint.load(args.ckpt, device, args.set)
    data = TokenData.open(args.data)
    ckpt_tok = json.loads((checkpoint.resolve(args.ckpt) / "tokenizer.json").read_text(encoding="utf-8"))
    if ckpt_tok != json.loads((data.path / "tokenizer.json").read_text(encoding="utf-8")):
        raise LadderError(f"{args.ckpt} was trained with another tokenizer than the one in {args.data}")
    if args.samples and args.sample_length > len(data.val):
        raise LadderError(f"--sample-length {args.sample_length} exceeds the validation split ({len(data.val)} tokens)")
    scorer = model
    if args.scorer:  # loaded and checked before the long evaluation, not after it
        scorer = checkpoint.load(args.scorer, device)[0]
        if json.loads((checkpoint.resolve(args.scorer) / "tokenizer.json").read_text(encoding="utf-8")) != ckpt_tok:
            raise LadderError(f"scorer {args.scorer} was trained with another tokenizer than {args.ckpt}")
    result = evaluate(model, data, args.rows, args.batch_size)
    if args.samples:
        quality = sample_quality(model, scorer, data, args.samples, args.sample_length, args.seed)
        result.update(quality["model"], sample_quality=quality)
    if args.save:
        ckpt = checkpoint.resolve(args.ckpt)  # a run's ckpt/: the run dir gets it; a checkpoint dir elsewhere: that dir
        path = (ckpt.parent if ckpt.name in ("ckpt", "ckpt.old") else ckpt) / "eval.json"
        write_whole(path, json_line(result, indent=2) + "\n")
    if args.json:
        print(json_line(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import run_bench
    from .config import json_line

    if args.repeats < 1:
        raise LadderError("--repeats must be >= 1")
    result = run_bench(args.preset, args.set, args.repeats)
    print(json_line(result, indent=None if args.json else 2))


def cmd_explain(args: argparse.Namespace) -> None:
    from .explain import explain

    if not 1 <= args.n_step <= 64 or not 0 <= args.new_tokens <= 64 or len(args.prompt) > 64:
        raise LadderError("--n-step must be in [1, 64], --new-tokens in [0, 64] and --prompt at most 64 characters")
    print(explain(args.n_step, _prompt_text(args.prompt), args.new_tokens))


def cmd_plot(args: argparse.Namespace) -> None:
    from .plot import plot

    print(f"wrote {plot(args.kind, [Path(r) for r in args.runs], Path(args.out))}")


SAMPLING_HELP = (
    "change how the model samples: model.sample_fill=raw|renoise, model.prompt_noise=sample|zero, "
    "model.prompt_read=parallel|passes|stream"
)


def build_parser() -> ArgumentParser:
    from .config import preset_names

    parser = ArgumentParser(prog="ladderlm", description="Pipelined latent-diffusion ('ladder') language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    p = sub.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin")
    p.add_argument("--source", default="stdlib", help="stdlib (embedded default), shakespeare (download), or a file/dir PATH")
    p.add_argument("--tokenizer", choices=("char", "bpe"), default="char", help="characters, or byte-level BPE")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (512 unless given)")
    p.add_argument("--out", required=True, help="a new (or empty) directory")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model (or --resume one)")
    p.add_argument(
        "--preset", help=f"one of: {', '.join(preset_names())}; with neither --preset nor --config, the built-in defaults"
    )
    p.add_argument("--config", help="a TOML config file")
    p.add_argument("--data", required=True, help="a dir written by `ladderlm prepare`")
    p.add_argument("--out", required=True, help="run dir, new or empty: config, metrics, TensorBoard events, ckpt/")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.max_iters=100"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("--ckpt", required=True, help="a run dir or its ckpt/ dir")
    p.add_argument("--prompt", action="append", help="repeat for several prompts, sampled as one batch")
    p.add_argument("--stop", action="append", default=[], help="a string that ends a sample (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, help="sample among the K likeliest tokens only")
    p.add_argument("--top-p", type=float, help="sample among the likeliest tokens holding probability P (nucleus)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--no-slide", action="store_true", help="stop at the end of the context window instead of sliding it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SAMPLING_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="score the whole validation split")
    p.add_argument("--ckpt", required=True, help="a run dir or its ckpt/ dir")
    p.add_argument("--data", required=True, help="a dir written by `ladderlm prepare`, with the run's tokenizer")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SAMPLING_HELP)
    p.add_argument("--rows", type=int, default=64, help="the split is read as this many parallel streams")
    p.add_argument("--batch-size", type=int, default=32, help="windows per teacher-forced batch")
    p.add_argument("--save", action="store_true", help="also write the results to eval.json in the run dir (for `plot`)")
    p.add_argument("--samples", type=int, default=0, help="also generate this many samples and report their quality")
    p.add_argument("--scorer", help="checkpoint that scores the samples (gen_ppl), normally the GPT baseline; default: the model")
    p.add_argument("--sample-length", type=int, default=256, help="tokens per sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="speed of the ladder against the GPT: prefill, decoding, training")
    p.add_argument("--preset", default="bench", help="the models' sizes (both the same)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (the median is reported)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("explain", help="print the ladder's slot diagram for a prompt, phase by phase")
    p.add_argument("--n-step", type=int, default=4, help="rungs S")
    p.add_argument("--prompt", default="ABC", help="each character is one token")
    p.add_argument("--new-tokens", type=int, default=2, help="phase iii steps to draw")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("plot", help="plot runs: loss curves, per-rung statistics, free-running vs teacher-forced loss")
    p.add_argument("runs", nargs="+")
    p.add_argument("--kind", choices=("losses", "rungs", "free-vs-tf"), default="losses", help="rungs, free-vs-tf read eval.json")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_plot)
    return parser


OUT_OF_MEMORY_HINTS = {
    "train": "a smaller train.batch_size (train.grad_accum keeps the batch) or model; for a ladder model.recompute_passes=true",
    "sample": "fewer --prompt x --num-samples rows or a smaller --max-new-tokens",
    "eval": "a smaller --batch-size, --rows or --samples",
    "bench": "a smaller preset",
}


def _interrupt(_signum: int, _frame) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: temp files are removed on the way out (train stops at a step instead)


def main(argv: list[str] | None = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        return _main(argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        if args.command != "train" and os.environ.get("WORLD_SIZE", "1") != "1":  # each process would do the whole job
            raise LadderError(f"{args.command} runs in one process: start it without torchrun (train is the command it runs)")
        if sys.stdout is None:  # started with stdout closed: print() would drop the results silently
            raise LadderError("standard output is closed")
        for stream in (sys.stdout, sys.stderr):  # text the terminal's encoding lacks is shown as "?", not a traceback
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(errors="replace")
        args.func(args)
        sys.stdout.flush()  # here, where a broken pipe is caught, not at exit
    except LadderError as e:
        print(f"ladderlm: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"ladderlm: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("ladderlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush cannot fail again
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe
    except OSError as e:
        print(f"ladderlm: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:  # torch's allocators raise RuntimeError (CUDA: its subclass OutOfMemoryError)
        too_big = ("out of memory", "can't allocate memory", "Storage size calculation overflowed")  # the last: past 2**63 bytes
        if not isinstance(e, MemoryError) and not any(m in str(e) for m in too_big):
            raise
        hint = OUT_OF_MEMORY_HINTS.get(getattr(args, "command", None))
        reason = str(e).splitlines()[0] if str(e) else "MemoryError"
        print(f"ladderlm: error: out of memory: {reason}" + (f"; try {hint}" if hint else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
