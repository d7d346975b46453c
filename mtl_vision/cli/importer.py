"""`mtl-import source=<codebase> file=<their checkpoint> experiment=<ours> out=<file.ckpt> [overrides]`.

Turns a checkpoint saved by the authors' code (InvPT, TaskPrompter, MLoRE, ...) into an
mtl_vision checkpoint of the model that the training config with these overrides builds: the
same self-describing file `mtl-train` writes, so `mtl-eval ckpt=`, `mtl-predict ckpt=` and
`init_from=` accept it. The dataset's folder (`data.root`) must exist: its class lists size the
heads. Every missing, unexpected or mis-shaped weight is named, and nothing is written unless the
file fills the model exactly.

    mtl-import source=invpt file=InvPT_nyud.pth.tar experiment=invpt_nyud out=invpt_nyud.ckpt data.root=/data/NYUDv2
"""

from __future__ import annotations

import logging
import sys

from mtl_vision.cli import CONFIG_DIR, check_config_dir, exit_with_one_line, user_errors

log = logging.getLogger(__name__)
OWN_KEYS = ("source", "file", "out")
USAGE = "usage: mtl-import source=<codebase> file=<checkpoint> experiment=<name> out=<file.ckpt> [overrides]"


def split_arguments(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """(the import's own `source=`, `file=`, `out=`; the training-config overrides)."""
    own: dict[str, str] = {}
    overrides = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    missing = [k for k in OWN_KEYS if not own.get(k)]
    if missing:
        raise ValueError(f"mtl-import needs {', '.join(f'{k}=' for k in missing)}; {USAGE}")
    return own, overrides


def run(args: list[str]) -> str:
    """Compose the training config with `args`' overrides and write the imported checkpoint."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from mtl_vision.cli import run_dir_of

    from mtl_vision.cli.overrides import check_overrides
    from mtl_vision.engine.quiet import quiet_lightning
    from mtl_vision.importing import import_checkpoint

    own, overrides = split_arguments(args)
    check_overrides("train", overrides)
    quiet_lightning()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        # the imported checkpoint stands for a run whose directory is the one it is written into
        cfg.paths.output_dir = run_dir_of(own["out"])
    out = import_checkpoint(cfg, source=own["source"], file=own["file"], out=own["out"])
    log.info("wrote %s (from %s, source=%s)", out, own["file"], own["source"])
    print(f"wrote {out}")
    return str(out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_config_dir()
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return
    try:
        run(sys.argv[1:])
    except user_errors() as err:
        exit_with_one_line(err)


if __name__ == "__main__":
    main()
