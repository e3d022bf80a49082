"""Static SASS size of each kernel in a cubin, without a disassembler (none ships in this
container): the ELF section ``.text.<mangled kernel>`` holds the kernel's machine code, and every
sm_90 instruction is 16 bytes, so its size / 16 is the instruction count.

    nvcc -cubin csrc/mla/mla_decode.cu -o /tmp/mla.cubin <the build's flags, -gencode=arch=compute_90a,code=sm_90a>
    python bench/experiments/sass_size.py /tmp/mla.cubin [name-substring]

Use it to compare two builds of a kernel (before / after a change), not as a run-time count:
unrolled loops and both warp-role paths are all in it.
"""

from __future__ import annotations

import struct
import sys


def kernel_sizes(path: str) -> list[tuple[int, str]]:
    data = open(path, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "expected a 64-bit ELF cubin"
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    # Section header: name, type, flags, addr, offset, size, link, info, addralign, entsize.
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]

    def name(off: int) -> str:
        end = data.index(b"\0", names_at + off)
        return data[names_at + off:end].decode()

    out = []
    for h in headers:
        n = name(h[0])
        if n.startswith(".text."):
            out.append((h[5] // 16, n[len(".text."):]))
    return out


if __name__ == "__main__":
    pattern = sys.argv[2] if len(sys.argv) > 2 else ""
    for count, kernel in kernel_sizes(sys.argv[1]):
        if pattern in kernel:
            print(f"{count:7d}  {kernel}")
