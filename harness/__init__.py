"""Real processes and clients of the wire protocol, shared by the tests, the bench
and the local cluster: `processes` (standard library only), `wire` (what a
client must know of the protocol) and `client` (on the `websockets` library).
"""
