"""The device probe a capture task runs first: fail fast, in one line, before loading a model.

Checks, in order: the offline dataset is present (``data.path`` readable, or the dataset in the
HF hub cache); the model directory is readable (``config.json`` and every weight file, or the
hub id's snapshot in the cache); and, unless ``slurm.gpus`` is 0, that CUDA is available, that at
least ``slurm.gpus`` GPUs are visible, that each GPU holds its ``model.max_memory`` budget and that
the weights fit in the GPUs together. torch is imported only for those GPU checks.

Run as ``gap slurm probe CONFIG`` or ``python -m slurm.probe CONFIG``; exit 0 with one ``probe
ok`` line, or exit 1 with one ``error:`` line.

Examples
--------
>>> parse_bytes("70GiB"), parse_bytes("64G"), parse_bytes("500MB")
(75161927680, 68719476736, 500000000)
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from pathlib import Path

from schemas.config import Config, load_config
from schemas.errors import GapError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".png", ".jpg", ".jpeg")
# Weights need this share of the GPUs' memory at most: activations and the CUDA context need room.
WEIGHTS_SHARE = 0.9
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """Bytes in a size like ``70GiB``, ``80GB`` or Slurm's ``64G`` (Slurm's K/M/G/T are binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise GapError(f"cannot read {text!r} as a memory size (e.g. 70GiB)")
    number, prefix, suffix = m.groups()
    binary = suffix.lower() == "ib" or (prefix and not suffix)  # "64G" as Slurm and accelerate read it
    unit = _UNITS[(prefix.lower() + "ib") if binary and prefix else prefix.lower()]
    return int(float(number) * unit)


def _hub_cache() -> Path:
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return Path(os.environ.get("HF_HUB_CACHE", home / "hub"))


def _readable(path: Path, what: str) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise GapError(f"{what} {path} is not readable ({exc.strerror})") from None


def check_data(cfg: Config) -> str:
    """The dataset is on this node: ``data.path`` readable with data files, or in the hub cache."""
    data = cfg.data
    if data.name == "synthetic":
        return "data synthetic (generated)"
    if data.path is None:
        # the very snapshot the loader will read: the dataset's own hub repo, not any look-alike
        from capture.datasets import SPECS, hub_cache_snapshot

        repo = SPECS[data.name].repo
        snapshot = hub_cache_snapshot(repo)
        if snapshot is None:
            raise GapError(f"data.path is not set and {repo} ({data.name}) is not in the HF hub cache "
                           f"{_hub_cache()}: stage it with `gap data stage {data.name} --to DIR` and set data.path")
        return f"data {data.name} in hub cache ({snapshot})"
    root = Path(data.path).expanduser()
    if not root.exists():
        raise GapError(f"data.path {root} does not exist on {socket.gethostname()}")
    if root.is_file():
        _readable(root, "data.path")
        return f"data {root}"
    if not os.access(root, os.R_OK | os.X_OK):
        raise GapError(f"data.path {root} is not readable")
    files = [p for p in root.rglob("*") if p.suffix.lower() in DATA_SUFFIXES]
    if not files:
        raise GapError(f"data.path {root} holds no data files ({', '.join(DATA_SUFFIXES)})")
    _readable(files[0], "data file")
    return f"data {root} ({len(files)} files)"


def hub_snapshot(repo_dir: Path, revision: str | None) -> Path | None:
    """The snapshot of a cached hub repo that transformers loads offline, if it is there.

    ``revision`` (default ``main``) names a snapshot directory (a commit) or a ref whose file
    holds the commit, in that order, as ``huggingface_hub`` resolves it.
    """
    revision = revision or "main"
    snapshots = repo_dir / "snapshots"
    if (snapshots / revision).is_dir():
        return snapshots / revision
    ref = repo_dir / "refs" / revision
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    return None


def model_dir(cfg: Config) -> Path:
    """The local directory of ``model.path``: itself, or the snapshot of ``model.revision`` (or
    ``main``) in the hub cache, the one the loader reads."""
    path = Path(cfg.model.path).expanduser()
    if path.is_dir():
        return path
    snapshot = hub_snapshot(_hub_cache() / f"models--{cfg.model.path.replace('/', '--')}", cfg.model.revision)
    if snapshot is None:
        at = f" at revision {cfg.model.revision}" if cfg.model.revision else ""
        raise GapError(f"model.path {cfg.model.path} is neither a directory nor in the HF hub cache{at} "
                       f"{_hub_cache()} (compute nodes are offline): download it on a login node first")
    return snapshot


def check_model(cfg: Config) -> tuple[str, int]:
    """``config.json`` and every weight file readable; returns a description and the weight bytes."""
    root = model_dir(cfg)
    _readable(root / "config.json", "model config")
    weights = sorted(p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise GapError(f"model.path {root} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    for path in weights:
        _readable(path, "model weight file")
    # Shards of one format only: a checkpoint may ship both .safetensors and .bin copies.
    preferred = [p for p in weights if p.suffix == ".safetensors"] or weights
    size = sum(p.stat().st_size for p in preferred)
    return f"model {root} ({len(preferred)} weight files, {size / 1e9:.2f} GB)", size


def check_gpus(cfg: Config, weight_bytes: int) -> str:
    """CUDA available, >= ``slurm.gpus`` devices, ``model.max_memory`` and the weights fit."""
    import torch  # only here: the probe must start fast and run where torch is slow to import

    want = cfg.slurm.gpus
    host = socket.gethostname()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    if not torch.cuda.is_available():
        raise GapError(f"CUDA is not available on {host} (CUDA_VISIBLE_DEVICES={visible}) but slurm.gpus={want}: "
                       "check the partition and --gres, or set slurm.gpus=0 for a CPU run")
    have = torch.cuda.device_count()
    if have < want:
        raise GapError(f"{host} shows {have} GPU(s) (CUDA_VISIBLE_DEVICES={visible}), slurm.gpus asks for {want}")
    totals = [torch.cuda.get_device_properties(i).total_memory for i in range(want)]
    for key, budget in (cfg.model.max_memory or {}).items():
        if str(key).isdigit() and int(key) < want and parse_bytes(budget) > totals[int(key)]:
            raise GapError(f"model.max_memory[{key}]={budget} exceeds GPU {key}'s "
                           f"{totals[int(key)] / 2**30:.1f} GiB on {host}")
    if weight_bytes > WEIGHTS_SHARE * sum(totals):
        raise GapError(f"model weights ({weight_bytes / 1e9:.1f} GB) do not fit in {want} GPU(s) of "
                       f"{sum(totals) / want / 2**30:.1f} GiB on {host}: raise slurm.gpus")
    name = torch.cuda.get_device_name(0)
    return f"{want} x {name} ({totals[0] / 2**30:.1f} GiB)"


def probe(cfg: Config) -> str:
    """Run every check; return the one-line summary or raise a one-line :class:`GapError`."""
    parts = [check_data(cfg)]
    text, weight_bytes = check_model(cfg)
    parts.append(text)
    parts.insert(0, check_gpus(cfg, weight_bytes) if cfg.slurm.gpus else "CPU only (slurm.gpus=0)")
    return f"probe ok on {socket.gethostname()}: " + "; ".join(parts)


def main(argv: list[str]) -> int:
    """``gap slurm probe CONFIG [--set k=v]``: check this node before a capture task starts."""
    parser = argparse.ArgumentParser(
        prog="gap slurm probe",
        description="Check a compute node before capture: dataset present offline, model directory "
                    "readable, and (unless slurm.gpus is 0) CUDA, GPU count and memory against the "
                    "config. Prints one line; exit 1 with one error line on the first problem.")
    parser.add_argument("config", help="the run's config (RUN/slurm/config.yaml in a job)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (YAML value); repeatable")
    args = parser.parse_args(argv)
    print(probe(load_config(args.config, args.overrides)), flush=True)
    return 0


def _run_module(argv: list[str]) -> int:
    try:
        return main(argv)
    except GapError as exc:
        print(f"gap slurm probe: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(_run_module(sys.argv[1:]))
