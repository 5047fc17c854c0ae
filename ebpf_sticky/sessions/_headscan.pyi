from collections.abc import Callable

class LineSearch:
    def __init__(
        self,
        needles: tuple[bytes, ...],
        fields: Callable[[bytes, int, int], object] | None,
        read: Callable[[bytes, int, int], object],
    ) -> None: ...
    def read(self, data: bytes, start: int, end: int, /) -> object: ...
