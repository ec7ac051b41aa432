"""``python -m vittm.models.convert SRC DST``: a ViTTM weight file (the authors', or ours in any wrapper) ->
``.safetensors`` in this framework's key names, printing what was mapped and what was dropped.

SRC may be anything vittm.models.loading reads (e.g. the authors' published EMA file, keys
``module._orig_mod.*`` + ``n_averaged``; a Lightning checkpoint; a plain state dict). DST is written atomically and
never over an existing file unless ``--overwrite``. No model is built: the key mapping needs none. The result loads
with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=DST))``, ``finetune.from_ckpt=DST``
and ``mode=eval ckpt_path=DST`` (with the model flags that match the file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vittm.core.files import CheckpointError, save_weights
from vittm.models.loading import FORMATS, WeightsError, describe, read_state_dict, to_vittm_layout


def convert(src: str | Path, dst: str | Path, overwrite: bool = False) -> list[str]:
    """Convert ``src`` into ``dst``; returns the lines to print. Raises ``WeightsError``/``CheckpointError``."""
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise WeightsError(f"DST={str(dst)!r}: must end in .safetensors (the file format written)")
    if dst.exists() and not overwrite:
        raise WeightsError(f"DST={str(dst)!r}: exists; choose another name or pass --overwrite")
    if dst.exists() and dst.resolve() == src.resolve():
        raise WeightsError(f"DST={str(dst)!r}: is SRC itself; write to another file")
    weights = to_vittm_layout(read_state_dict(src, key="SRC"), key="SRC")
    save_weights(weights.state, dst, metadata={"format": "vittm", "converted_from": src.name,
                                               "source_layout": weights.fmt})
    lines = [f"read {weights.source}: {FORMATS[weights.fmt]} key names" +
             "".join(f"; {note}" for note in weights.notes),
             f"wrote {str(dst)!r}: {len(weights.state)} tensors in this framework's key names "
             f"({describe(weights.state)})"]
    for why, keys in weights.dropped.items():
        lines.append(f"dropped {len(keys)}: {why}: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}")
    if not weights.dropped:
        lines.append("dropped nothing")
    lines.append(f"load it with pretrained_cfg_overlay=dict(file={str(dst)!r}), finetune.from_ckpt={dst} or "
                 f"mode=eval ckpt_path={dst}, with the model flags that match the line above")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vittm.models.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="SRC", help="a ViTTM weight file (.pth/.pt/.bin/.ckpt/.safetensors)")
    parser.add_argument("dst", metavar="DST", help="the .safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        lines = convert(args.src, args.dst, overwrite=args.overwrite)
    except (WeightsError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(lines))


if __name__ == "__main__":
    main()
