"""Read the *data* in a pickle file without running it: CIFAR-10's python batches are pickles.

``pickle.load`` executes whatever a file asks for (any importable callable), so a data file that someone
sent you could run code. This reader walks the file's opcodes with :func:`pickletools.genops` (which only
parses) and builds the values on a stack itself: dicts, lists, tuples, strings, bytes, numbers, and numpy
arrays through the few constructors numpy's own pickles name (``_reconstruct``, ``dtype``, ``_frombuffer``)
and ``_codecs.encode`` (Python 2 byte strings pickled by Python 3). Any other global, or an opcode outside
that set, is refused with :class:`UnsafePickleError` before anything is built from it.
"""

from __future__ import annotations

import pickletools
from typing import IO, Any

import numpy as np

__all__ = ["UnsafePickleError", "load_pickled_data"]


class UnsafePickleError(ValueError):
    """The file asks for something other than plain data and numpy arrays."""


_MARK = object()


class _ArrayStub:
    """``numpy.core.multiarray._reconstruct(...)``: an array whose contents come with the next BUILD."""

    value: np.ndarray | None = None


def _reconstruct(*_args) -> _ArrayStub:
    return _ArrayStub()


def _dtype(spec, *_args) -> np.dtype:
    if not isinstance(spec, str) or spec == "O" or spec.startswith(("O", "|O")):
        raise UnsafePickleError(f"dtype {spec!r} is not a plain numeric dtype")
    return np.dtype(spec)


def _frombuffer(buffer, dtype, shape, order) -> np.ndarray:
    return _array(buffer, dtype, shape, order == "F")


def _encode(text, encoding="latin1") -> bytes:
    return str(text).encode(encoding)


def _array(raw, dtype, shape, fortran: bool) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(raw, (bytes, bytearray)):
        raise UnsafePickleError("an array whose contents are not plain bytes of a numeric dtype")
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(tuple(shape), order="F" if fortran else "C").copy()


SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _encode,
}


def _build(target, state):
    if isinstance(target, _ArrayStub) and isinstance(state, tuple) and len(state) == 5:
        _version, shape, dtype, fortran, raw = state
        target.value = _array(raw, dtype, shape, bool(fortran))
        return target
    if isinstance(target, np.dtype):  # a dtype's byte order and flags: the spec string already fixed them
        return target
    raise UnsafePickleError(f"cannot set the state of {type(target).__name__}")


def _resolve(value):
    """Replace array stubs, wherever they sit in the built structure, by their arrays."""
    if isinstance(value, _ArrayStub):
        if value.value is None:
            raise UnsafePickleError("an array without contents")
        return value.value
    if isinstance(value, dict):
        return {_resolve(k): _resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v) for v in value)
    return value


def _pop_mark(stack: list) -> list:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1 :]
            del stack[i:]
            return items
    raise UnsafePickleError("MARK missing")


def load_pickled_data(handle: IO[bytes]) -> Any:
    """The value a pickle holds, if it is plain data and numpy arrays; Python 2 strings become bytes."""
    stack: list = []
    memo: dict[int, Any] = {}
    for opcode, arg, _pos in pickletools.genops(handle):
        name = opcode.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            if len(stack) != 1:
                raise UnsafePickleError("malformed pickle")
            return _resolve(stack[0])
        if name == "MARK":
            stack.append(_MARK)
        elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE"):
            stack.append({"EMPTY_DICT": {}, "EMPTY_LIST": [], "EMPTY_TUPLE": ()}[name])
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name in ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "BINFLOAT", "INT", "LONG", "FLOAT"):
            stack.append(arg)
        elif name in ("SHORT_BINSTRING", "BINSTRING", "STRING"):  # Python 2 str: bytes, as encoding="bytes" gives
            stack.append(arg.encode("latin1") if isinstance(arg, str) else bytes(arg))
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            stack.append(arg)
        elif name in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"):
            stack.append(bytes(arg))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            size = int(name[-1])
            items = stack[-size:]
            del stack[-size:]
            stack.append(tuple(items))
        elif name == "TUPLE":
            stack.append(tuple(_pop_mark(stack)))
        elif name == "LIST":
            stack.append(list(_pop_mark(stack)))
        elif name == "DICT":
            items = _pop_mark(stack)
            stack.append(dict(zip(items[::2], items[1::2])))
        elif name == "APPEND":
            value = stack.pop()
            _container(stack[-1], list).append(value)
        elif name == "APPENDS":
            items = _pop_mark(stack)
            _container(stack[-1], list).extend(items)
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            _container(stack[-1], dict)[_hashable(key)] = value
        elif name == "SETITEMS":
            items = _pop_mark(stack)
            target = _container(stack[-1], dict)
            for key, value in zip(items[::2], items[1::2]):
                target[_hashable(key)] = value
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            if int(arg) not in memo:
                raise UnsafePickleError("memo reference before its value")
            stack.append(memo[int(arg)])
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, _, attribute = str(arg).partition(" ")
            else:
                attribute, module = stack.pop(), stack.pop()
            if (module, attribute) not in SAFE_GLOBALS:
                raise UnsafePickleError(f"the file asks to call {module}.{attribute}; only data is read")
            stack.append(SAFE_GLOBALS[(module, attribute)])
        elif name in ("REDUCE", "NEWOBJ"):
            args, function = stack.pop(), stack.pop()
            if function not in SAFE_GLOBALS.values() or not isinstance(args, tuple) or function is np.ndarray:
                raise UnsafePickleError("a call that is not one of numpy's array constructors")
            stack.append(function(*args))
        elif name == "BUILD":
            state = stack.pop()
            stack[-1] = _build(stack[-1], state)
        else:
            raise UnsafePickleError(f"pickle opcode {name} is not plain data")
    raise UnsafePickleError("the pickle ends without STOP")


def _container(value, kind):
    if not isinstance(value, kind):
        raise UnsafePickleError(f"expected a {kind.__name__} on the stack")
    return value


def _hashable(key):
    if not isinstance(key, (str, bytes, int, float, bool, type(None))):
        raise UnsafePickleError("a dict key that is not a plain value")
    return key
