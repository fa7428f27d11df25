"""`python -m compile`: build a kiln `.pt2` package, or inspect one."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from pydantic import ValidationError

from worker.argtypes import at_least, finite, parse_command_line, program, run_main
from worker.manifest import PackageError, Preprocess, read_manifest
from worker.process_signals import interrupts_held

EPILOG = """\
examples:
  python -m compile build                                  # EfficientNet-Lite0, real ImageNet weights
  python -m compile build resnet18 --weights r18.pth -o models/r18.pt2
  python -m compile build efficientnet_lite0 --device cuda --dtype bfloat16 --channels-last
  python -m compile build mypkg.models:make_net --labels classes.txt --resize 32 --crop 32 \\
      --mean 125 123 114 --std 63 62 66
  python -m compile inspect models/efficientnet_lite0-cpu-float32.pt2
"""


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one to show: not "None" beside a default the help explains."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "[default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    """This command's argument parser (the `kiln` launcher also tries command lines on it)."""
    parser = argparse.ArgumentParser(
        prog=program("compile"),
        description="Compile an image classifier into an AOTInductor package (.pt2) that kiln workers "
        "load, with a manifest (labels, preprocessing, batch range, device) stored inside.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser(
        "build",
        help="compile a model into a .pt2",
        description="Compile a model into a .pt2 package, check it against the eager model, and write it.",
        formatter_class=_DefaultsHelp,
    )
    build.add_argument(
        "model",
        nargs="?",
        default="efficientnet_lite0",
        help="efficientnet_lite0 (shipped ImageNet weights), a torchvision classifier name, or "
        "package.module:factory returning an nn.Module (or a compile.models.ModelSpec)",
    )
    build.add_argument(
        "-o", "--output", type=Path, help="where to write the package [default: models/MODEL-DEVICE-DTYPE.pt2]"
    )
    build.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device the package runs on")
    build.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    build.add_argument("--channels-last", action="store_true", help="run convolutions in channels_last layout (GPU)")
    build.add_argument(
        "--max-batch",
        type=at_least(3, 8192),
        help="largest batch the package takes, 3 to 8192 (the batch range starts at 2) [default: 64 on cpu, "
        "256 on cuda]",
    )
    build.add_argument(
        "--tune-batch", type=at_least(2), help="batch size Inductor tunes its kernels for [default: --max-batch]"
    )
    build.add_argument("--max-autotune", action="store_true", help="let Inductor benchmark kernel choices (slow build)")
    build.add_argument("--weights", help="state_dict file for the model's weights")
    build.add_argument("--labels", type=Path, help="class names, one per line (or a JSON list)")
    prep = build.add_argument_group("preprocessing (defaults: the model's own; ImageNet's for others)")
    prep.add_argument("--resize", type=at_least(1), help="short side after resizing, in pixels")
    prep.add_argument("--crop", type=at_least(1), help="centre crop side, in pixels (at most --resize)")
    prep.add_argument(
        "--interpolation", choices=["nearest", "bilinear", "bicubic", "lanczos"], help="resize filter (Pillow's)"
    )
    prep.add_argument("--mean", type=finite, nargs=3, metavar=("R", "G", "B"), help="per-channel mean, 0..255 units")
    prep.add_argument(
        "--std", type=finite, nargs=3, metavar=("R", "G", "B"), help="per-channel std, 0..255 units, above 0"
    )

    inspect = commands.add_parser(
        "inspect",
        help="print a package's manifest as JSON",
        description="Print the manifest stored in a .pt2 package (model, weights digest, labels, "
        "preprocessing, batch range, device, versions) as JSON.",
    )
    inspect.add_argument("package", type=Path, help="the .pt2 package to read")
    commands.add_parser(
        "models",
        help="list the model names `build` accepts",
        description="List the model names `build` accepts: kiln's own and torchvision's classifiers.",
    )
    for command in commands.choices.values():
        command.set_defaults(command_parser=command)  # for parse_command_line
    return parser


def _read_labels(path: Path) -> list[str]:
    """Class names, one per line or a JSON list. Raises ValueError naming the file."""
    try:
        text = path.read_text()
        if text.lstrip().startswith(("[", "{")):
            names = json.loads(text)
            if not isinstance(names, list):
                raise ValueError(f"cannot read labels {path}: a JSON file of labels is a list of names")
            return [str(x) for x in names]
    except OSError as e:
        raise ValueError(f"cannot read labels {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read labels {path}: {e}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _preprocess_error(error: ValidationError) -> str:
    """Pydantic's errors for the preprocessing, in one line, each named by its option."""
    return "; ".join(
        (f"--{problem['loc'][0]}: " if problem["loc"] else "") + problem["msg"].removeprefix("Value error, ")
        for problem in error.errors()
    )


def _check_output(output: Path) -> None:
    """Before the minutes of a build: `output`'s folder (made if missing) takes a new file.
    Raises OSError naming `output`."""
    from worker.atomic_file import replacing

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot write {output}: cannot make its folder: {e.strerror or e}") from e
    with replacing(output, keep=False, suffix=".pt2"):
        pass


def _build(args: argparse.Namespace) -> int:
    with interrupts_held():  # torch's import would lose a Ctrl-C, or turn it into an ImportError
        import torch

        from compile.models import ModelError, resolve_model
        from compile.package import BuildOptions, build_package
        from compile.verify import BuildError

    options = BuildOptions(
        device=args.device,
        dtype=args.dtype,
        channels_last=args.channels_last,
        max_batch=args.max_batch if args.max_batch is not None else (256 if args.device == "cuda" else 64),
        max_autotune=args.max_autotune,
        tune_batch=args.tune_batch,
    )
    output = args.output or Path("models") / f"{args.model.replace(':', '.')}-{args.device}-{args.dtype}.pt2"
    try:  # the command line and its files: exit 2, nothing built
        if args.tune_batch is not None and args.tune_batch > options.max_batch:
            raise ValueError(f"--tune-batch ({args.tune_batch}) must not exceed --max-batch ({options.max_batch})")
        spec = resolve_model(args.model, args.weights)
        overrides = {k: getattr(args, k) for k in ("resize", "crop", "interpolation", "mean", "std")}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides:
            spec = replace(spec, preprocess=Preprocess(**{**spec.preprocess.model_dump(), **overrides}))
        if args.labels:
            spec = replace(spec, labels=_read_labels(args.labels))
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "--device cuda, but this host has no usable CUDA device: build CUDA packages on a GPU host"
            )
        _check_output(output)
    except ValidationError as e:
        print(f"error: {_preprocess_error(e)}", file=sys.stderr)
        return 2
    except (ModelError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # the build and its check: exit 1
        manifest = build_package(spec, output, options)
    except (BuildError, PackageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB): {manifest.model}, {len(manifest.labels)} classes, "
        f"{manifest.device} {manifest.compute_dtype}, batch {manifest.batch_min}..{manifest.batch_max}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "inspect":
        try:
            manifest = read_manifest(args.package).model_dump()
            labels = manifest.pop("labels")  # last: a thousand lines of them hid the rest on a terminal
            print(json.dumps({**manifest, "labels": labels}, indent=2))
        except PackageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        if args.command == "models":
            with interrupts_held():  # torch's import would lose a Ctrl-C, or turn it into an ImportError
                from compile.models import DEFAULT_MODEL, torchvision_classifiers

            print("\n".join([DEFAULT_MODEL, *torchvision_classifiers()]))
            return 0
        return _build(args)
    except KeyboardInterrupt:  # Ctrl-C: torch's traceback from deep in the export says nothing more
        print("interrupted" + (": no package written" if args.command == "build" else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run_main(main))
