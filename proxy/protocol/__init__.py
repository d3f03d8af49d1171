"""The PostgreSQL wire protocol, version 3.0: bytes in, messages and decisions out.

Pure: this package imports only the standard library and never touches a socket, the
event loop or logging. Everything that frames, parses, encodes or tracks protocol state
lives here; the connection code only moves bytes and acts on what this layer reports.
"""
