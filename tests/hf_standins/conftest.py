"""The stand-ins are modules for transformers' test mixins (see README.md), not tests of ours."""

collect_ignore_glob = ["*.py"]
