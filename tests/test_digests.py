"""The content digests that record what made a file, a cache or a checkpoint (core.io)."""
import copy

import torch

from core.io import file_digest, json_digest, state_dict_digest


def test_file_digest_follows_the_bytes_not_the_name(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * (5 << 20))  # more than one read block
    (tmp_path / "b").write_bytes(b"x" * (5 << 20))
    (tmp_path / "c").write_bytes(b"x" * (5 << 20) + b"y")
    assert file_digest(tmp_path / "a") == file_digest(tmp_path / "b") != file_digest(tmp_path / "c")


def test_json_digest_ignores_key_order_only():
    assert json_digest({"a": 1, "b": [1, 2]}) == json_digest({"b": [1, 2], "a": 1})
    assert json_digest({"a": 1, "b": [1, 2]}) != json_digest({"a": 1, "b": [2, 1]})


def test_state_dict_digest_sees_one_changed_weight_and_its_dtype():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert state_dict_digest(a) == state_dict_digest(b)
    with torch.no_grad():
        b.weight[2, 1] += 1e-3
    assert state_dict_digest(a) != state_dict_digest(b)
    assert state_dict_digest(a) != state_dict_digest(copy.deepcopy(a).to(torch.bfloat16))
