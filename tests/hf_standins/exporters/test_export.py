"""Stand-in for transformers' `tests/exporters/test_export.py`, which the sdist does not ship.

`test_modeling_common.ModelTesterMixin` derives from `ExportTesterMixin`. The real class adds
`torch.export` tests; this stand-in adds none (NaViL's packed vision encoder is data-dependent and
declares `_can_compile_fullgraph = False`).
"""


class ExportTesterMixin:
    """Empty stand-in: no export tests."""
