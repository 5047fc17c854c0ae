import re
from collections.abc import Callable

class LineSearch:
    def __init__(
        self,
        needles: tuple[bytes, ...],
        fields: Callable[[bytes, int, int], object] | None,
        read: Callable[[bytes, int, int], object],
        line_key: tuple[Callable[[bytes, int], re.Match[bytes] | None], bytes] | None = None,
        max_head: int = -1,
    ) -> None: ...
    def read(self, data: bytes, start: int, end: int, /) -> object: ...
