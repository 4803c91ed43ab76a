"""Run folder names: `{train_dir}/{dataset}/{name}/`, the same settings always the same name
(that is how a re-run finds its run to resume), other settings another name.

Two schemes (--run_naming):
    short (default)  `{Algorithm}_{key}{value}_..._{digest}`: only the hyper-parameters whose
                     value differs from its default, in libml's `{key}{value}` form (the flag's
                     name, keys sorted; the algorithm's own kept first when they do not all fit
                     in SHORT_MAX bytes), ending with 8 hex digits of a
                     digest of every hyper-parameter (exact values), so that two settings never
                     share a folder even when the shown part is cut, rounded or equal:
                     `RealMix_batch8_gamma0.25_tsalinear_3f09c1d2`
    libml            libml's `{Algorithm}_{key}{value}_...` with every hyper-parameter, keys
                     sorted (spec §9; 150-250 bytes), over 255 bytes cut and ended with a digest.

A run started under the libml scheme is resumed where it is: under --run_naming=short, when
the short folder does not exist but the libml one of the same settings holds a run (args/), the
trainer continues there and says so. args/args.json records every value either way.
"""
import hashlib
import os
import sys
from typing import Dict, Optional, Sequence

NAMINGS = ("short", "libml")
MAX_NAME_BYTES = 255        # file systems refuse longer names
SHORT_MAX = 100             # the short name's length cap (bytes, digest included)
DIGEST_CHARS = 8


def _fmt(value) -> str:
    if isinstance(value, float):
        # Derived decays such as 1 - 10/steps print 17 digits; file names are limited to 255 bytes.
        value = float(f"{value:.6g}")
    return str(value).replace("/", "-").replace(" ", "")


def _full_name(algorithm: str, hparams: dict) -> str:
    return "_".join([algorithm] + [f"{k}{_fmt(v)}" for k, v in sorted(hparams.items())])


def run_folder_name(algorithm: str, hparams: dict) -> str:
    """libml's `{Algorithm}_{key}{value}_...` with keys sorted (spec §9); a name over 255 bytes
    (many hyper-parameters) keeps its first bytes and ends with a digest of the whole name
    (args/args.json records every value)."""
    name = _full_name(algorithm, hparams)
    if len(name.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha1(name.encode()).hexdigest()[:16]
        name = name.encode()[:MAX_NAME_BYTES - len(digest) - 1].decode(errors="ignore")
        name = f"{name}_{digest}"
    return name


def short_run_folder_name(algorithm: str, hparams: dict, defaults: Dict[str, object],
                          first: Sequence[str] = ()) -> str:
    """`{Algorithm}_{the non-default key/values}_{digest of all}` (module docstring). Keys
    without a known default (nclass: the dataset's) only enter the digest. When the changed
    ones do not all fit, the keys in `first` (the algorithm's own) are kept first; the shown
    ones are in key order."""
    exact = "_".join([algorithm] + [f"{k}={v!r}" for k, v in sorted(hparams.items())])
    digest = hashlib.sha1(exact.encode()).hexdigest()[:DIGEST_CHARS]
    changed = {k: f"{k}{_fmt(v)}" for k, v in hparams.items()
               if k in defaults and _fmt(v) != _fmt(defaults[k])}
    budget = SHORT_MAX - len(algorithm.encode()) - 1 - DIGEST_CHARS
    shown = []
    for key in sorted(changed, key=lambda k: (k not in first, k)):
        size = len(changed[key].encode()) + 1
        if size <= budget:          # the others only in the digest (and args.json)
            shown.append(key)
            budget -= size
    return "_".join([algorithm] + [changed[k] for k in sorted(shown)] + [digest])


def is_digest(token: str) -> bool:
    """The last word of a short run folder name."""
    return len(token) == DIGEST_CHARS and all(c in "0123456789abcdef" for c in token)


def run_dir(root: str, algorithm: str, hparams: dict, defaults: Dict[str, object],
            naming: str = "short", first: Sequence[str] = (), say: Optional[callable] = None) -> str:
    """The run folder under `root` ({train_dir}/{dataset}) of these settings (module docstring:
    a libml-named run of the same settings is continued where it is)."""
    libml = os.path.join(root, run_folder_name(algorithm, hparams))
    if naming == "libml":
        return libml
    short = os.path.join(root, short_run_folder_name(algorithm, hparams, defaults, first))
    if not os.path.isdir(short) and os.path.isdir(os.path.join(libml, "args")):
        (say or _say)(f"note: continuing the run of these settings in {libml} (a libml-named "
                      f"folder; new runs get short names unless --run_naming=libml)")
        return libml
    return short


def _say(line: str) -> None:
    print(line, file=sys.stderr)
