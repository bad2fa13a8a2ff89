"""Stand-in for transformers' `tests/generation/test_utils.py`, which the sdist does not ship.

`test_modeling_common.py` imports `GenerationTesterMixin` from it, and its
`test_generation_tester_mixin_inheritance` checks that a tester of a model that can `generate`
inherits that class. The real mixin runs transformers' `generate` test battery; this one is empty
on purpose: NaViL's generation is covered by our own tests (tests/model/test_modeling.py, test_chat.py).
"""


class GenerationTesterMixin:
    """Empty stand-in: no generation tests are run through the transformers mixins."""
