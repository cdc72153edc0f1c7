"""Hypothesis strategies for client frames: any JSON value, and objects of the
real client frame types with arbitrary fields (docs/protocol.md).

Shared by the parser's fuzz test and the fuzzing of a real worker.
"""

from __future__ import annotations

from hypothesis import strategies as st

CLIENT_FRAME_TYPES = ["message", "typing", "history", "members"]

# Any code point, lone surrogates included: JSON carries them as \u escapes.
any_text = st.text(
    st.characters(exclude_categories=())
    | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats()
    | any_text
    | st.integers(min_value=-(10**30), max_value=10**30),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)

typed_frames = st.fixed_dictionaries(
    {"type": st.sampled_from(CLIENT_FRAME_TYPES)},
    optional={
        "message": st.text(max_size=50) | any_text | json_values,
        "client_id": st.from_regex(r"[A-Za-z0-9_.:-]{1,8}", fullmatch=True)
        | json_values,
        "before": st.integers(min_value=-2, max_value=5) | json_values,
        "limit": st.integers(min_value=-1, max_value=250) | json_values,
        "after": st.text(max_size=20) | json_values,
    },
)

# What a fuzzed client sends: any JSON value, or a frame of a real type.
client_frames = json_values | typed_frames
