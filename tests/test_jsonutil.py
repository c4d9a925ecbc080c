"""``mlxgate.jsonutil.loads``: the nesting bound holds whatever form the text
comes in, right at the limit, and the bracket count that spares the walk
never lets a too-deep value through."""

from __future__ import annotations

import pytest

from mlxgate import jsonutil
from mlxgate.jsonutil import MAX_JSON_DEPTH


def nested(levels: int) -> str:
    return '{"a": ' * (levels - 1) + "[1]" + "}" * (levels - 1)


@pytest.mark.parametrize("form", [str, lambda t: t.encode(), lambda t: bytearray(t.encode()),
                                  lambda t: memoryview(t.encode())])
def test_nesting_is_bounded_at_the_limit_in_every_form(form) -> None:
    assert jsonutil.loads(form(nested(MAX_JSON_DEPTH))) is not None
    with pytest.raises(jsonutil.JSONError, match="nested more than"):
        jsonutil.loads(form(nested(MAX_JSON_DEPTH + 1)))
    # Brackets inside strings count towards the shortcut but not the depth: still parsed.
    assert jsonutil.loads(form('{"s": "' + "[" * (2 * MAX_JSON_DEPTH) + '"}')) == {"s": "[" * (2 * MAX_JSON_DEPTH)}
