"""What transformers drops from a GGUF's header, read without reading the rest of the file.

``gguf.GGUFReader`` parses every field and tensor entry (10.8 s for the Qwen2.5-Coder-0.5B file
here); these few keys are read in 0.1-0.25 s by walking the metadata alone.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The GGUF header keys (llama.cpp's) that say whether encoding a text puts BOS first and EOS
#: last, by the tokenizer attribute each sets. transformers' GGUF tokenizer reads neither.
GGUF_SPECIAL_FLAGS = {"add_bos_token": "tokenizer.ggml.add_bos_token",
                      "add_eos_token": "tokenizer.ggml.add_eos_token"}
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}  # metadata value type -> struct format


def _gguf_header_values(path: Path, keys: set[str]) -> dict[str, object]:
    """The values of the metadata ``keys`` present in a GGUF's header (an array reads as
    ``"array of N"``), reading nothing past the metadata: 0.1 s for a 49k-token vocabulary."""
    import mmap
    import struct

    def string(pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", blob, pos)
        if pos + 8 + n > len(blob):
            raise struct.error("a string runs past the end of the file")
        return blob[pos + 8:pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n

    def value(pos: int, kind: int) -> tuple[object, int]:
        if kind in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[kind]
            return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
        if kind == 8:
            return string(pos)
        if kind != 9:
            raise struct.error(f"unknown metadata value type {kind}")
        sub, n = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if sub in _GGUF_SCALARS:
            return f"array of {n}", pos + n * struct.calcsize(_GGUF_SCALARS[sub])
        for _ in range(n):
            _, pos = value(pos, sub)
        return f"array of {n}", pos

    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:
                raise ValueError(f"{str(path)!r} is not a GGUF file (shorter than a header)")
            blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # read only where parsed
        with blob:
            if blob[:4] != b"GGUF":
                raise ValueError(f"{str(path)!r} is not a GGUF file (no GGUF magic bytes)")
            version, _, count = struct.unpack_from("<IQQ", blob, 4)
            if version not in (2, 3):
                raise ValueError(f"{str(path)!r}: GGUF version {version} is not supported (2, 3)")
            pos, found = 24, {}
            for _ in range(count):
                key, pos = string(pos)
                (kind,) = struct.unpack_from("<I", blob, pos)
                found[key], pos = value(pos + 4, kind)
        return {k: v for k, v in found.items() if k in keys}
    except (OSError, struct.error) as exc:
        raise ValueError(f"cannot read the GGUF header of {str(path)!r}: {exc}") from exc


def gguf_special_flags(path: str | os.PathLike) -> dict[str, bool]:
    """``{"add_bos_token": bool, "add_eos_token": bool}`` as a GGUF's header sets them; a flag
    the file does not set is left out (the tokenizer's own default then stands).

    Raises:
        ValueError: unreadable header, or a flag that is not a boolean (naming key and value).
    """
    values = _gguf_header_values(Path(path), set(GGUF_SPECIAL_FLAGS.values()))
    flags = {name: values[key] for name, key in GGUF_SPECIAL_FLAGS.items() if key in values}
    for name, on in flags.items():
        if not isinstance(on, bool):
            raise ValueError(f"{str(path)!r}: {GGUF_SPECIAL_FLAGS[name]} is {on!r}, not a boolean")
    return flags
