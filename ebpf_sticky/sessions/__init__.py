"""Session affinity beyond the source address: what the worker reads before the app sees a byte.

The pure parts live here: the PROXY protocol header (``proxy_protocol``), an HTTP/1.x request head
(``http_head``), and the session keys read from a head or learnt from a response (``keys``). They
take bytes and return values or raise their own declared errors, never anything else, whatever the
peer sends; every size they read is bounded. Nothing here touches the OS.
"""
