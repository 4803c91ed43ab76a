"""CIFAR "python version" batches read without running anything the file contains.

The original archives are Python pickles, and `pickle.loads` calls whatever functions a pickle
names: a crafted `cifar-10-python.tar.gz` (picked up automatically from $ML_DATA/downloads)
could run any command. `load_batch` reads them with a restricted unpickler that resolves only
the few globals the real files use, each wrapped so that it can build nothing but what the
real format holds:

- `numpy.ndarray` through numpy's `_reconstruct` (numpy 1 and 2 spellings), plain ndarrays only;
- `numpy.dtype` of booleans, integers and floats only (never `object`, whose arrays would
  unpickle arbitrary objects);
- `_codecs.encode(text, "latin1")`, how Python 3 protocol-2 pickles store bytes.

Any other global (os.system, builtins.eval, subprocess..., even harmless ones) is refused
before it is called, as is a batch whose values are not dicts, lists, bytes, str, numbers and
such arrays. Every refusal is a `UserError` naming the member and saying to download the
archive again (or to use the binary version, which holds no pickle).
"""
import codecs
import io
import pickle

import numpy as np

from libml.base.errors import UserError

_NUMERIC_KINDS = "biuf"
_PLAIN = (dict, list, tuple, bytes, str, int, float, bool, type(None), np.ndarray)


def _reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subclass {subtype!r} is not part of the CIFAR format")
    return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype))


def _dtype(spec, align=False, copy=True):
    dtype = spec if isinstance(spec, np.dtype) else np.dtype(_text(spec))
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"dtype {dtype!r} is not part of the CIFAR format")
    return np.dtype(dtype)


def _text(value):
    if isinstance(value, bytes):
        value = value.decode("latin1")
    if not isinstance(value, str) or len(value) > 8:
        raise pickle.UnpicklingError(f"dtype {value!r} is not part of the CIFAR format")
    return value


def _latin1(text, encoding="latin1"):
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("only latin-1 text may be encoded to bytes in a CIFAR batch")
    return codecs.encode(text, "latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which the CIFAR format never does")
        return allowed

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not part of the CIFAR format")


def _check_plain(value, depth: int = 0) -> None:
    if depth > 4 or not isinstance(value, _PLAIN) or type(value) not in _PLAIN:
        raise pickle.UnpicklingError(f"it holds a {type(value).__name__}, which the CIFAR format never does")
    if isinstance(value, np.ndarray) and value.dtype.kind not in _NUMERIC_KINDS:
        raise pickle.UnpicklingError(f"it holds an array of {value.dtype}, not numbers")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_plain(v, depth + 1)


def load(data: bytes, what: str):
    """The dict pickled in `data` (bytes keys, as `pickle.loads(..., encoding="bytes")` gives),
    or a UserError naming `what` if the pickle is anything but plain CIFAR data."""
    try:
        value = _Unpickler(io.BytesIO(data), encoding="bytes").load()
        _check_plain(value)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (a hostile or damaged pickle raises anything)
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{what} is not a CIFAR batch ({reason}); nothing in it was run: delete "
                        f"the archive and download it again (or use the binary version, "
                        f"cifar-10-binary.tar.gz / cifar-100-binary.tar.gz)") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} is not a CIFAR batch (it pickles a {type(value).__name__}, not a "
                        f"dict): delete the archive and download it again")
    return value


def load_batch(data: bytes, label_key: str, what: str):
    """(rows uint8 [N, 3072], labels int64 [N]) of a CIFAR batch; a UserError naming `what`
    when the pickle is not one (wrong types, sizes or labels)."""
    batch = load(data, what)
    rows, labels = batch.get(b"data"), batch.get(label_key.encode())
    problem = None
    if not isinstance(rows, np.ndarray) or rows.ndim != 2 or rows.shape[1] != 3072:
        problem = f"b'data' is {_describe(rows)}, not an array of N x 3072 pixels"
    elif not isinstance(labels, (list, np.ndarray)) or len(labels) != len(rows):
        problem = f"{label_key!r} is {_describe(labels)}, not {len(rows)} labels"
    elif not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in labels):
        problem = f"{label_key!r} holds values that are not integers"
    elif rows.dtype != np.uint8 and (rows.size and (rows.min() < 0 or rows.max() > 255)):
        problem = "b'data' holds values outside 0..255"
    if problem:
        raise UserError(f"{what} is not a CIFAR batch ({problem}): delete the archive and "
                        f"download it again")
    return rows.astype(np.uint8), np.asarray(labels, np.int64).reshape(-1)


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    if value is None:
        return "missing"
    return f"a {type(value).__name__}"
