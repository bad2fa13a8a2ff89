"""Stand-in for transformers' `tests/utils/test_configuration_utils.py`, which the sdist does not ship.

`test_configuration_common.ConfigTester.check_config_arguments_init` builds `config_class(**config_common_kwargs)`
and checks that every key comes back as the attribute of that name (`dtype` as `torch.float16`).
This is our own small set of common `PretrainedConfig` kwargs, each set to a non-default value,
checked to round-trip on every transformers version we support (5.16 - 5.24). (The check returns early
for composite configs such as `NaViLConfig`; it runs for configs without `sub_configs`.)
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "tie_word_embeddings": False,
    "chunk_size_feed_forward": 5,
    "architectures": ["NaViLForConditionalGeneration"],
    "id2label": {0: "label"},
    "label2id": {"label": 0},
    "problem_type": "regression",
    "is_decoder": True,
    "bos_token_id": 6,
    "pad_token_id": 7,
    "eos_token_id": 8,
}
