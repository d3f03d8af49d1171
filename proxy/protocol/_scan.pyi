# The optional C scanner (_scan.c); stream.scan_backend_py documents it.
def scan_backend(
    data: bytes, pos: int, interesting: bytes, max_length: int
) -> tuple[int, list[tuple[int, int, int]] | None, int, int]: ...
