"""encoder_digest / state_digest: a digest of the encoder's weights, whatever the file's format."""

from __future__ import annotations

import os

import pytest
import torch

from drasclr_lib.models import DrasEncoder
from drasclr_lib.models import fingerprint as fp


def _encoder_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return DrasEncoder(num_experts=2).state_dict()


def test_same_weights_same_digest_in_every_format(tmp_path):
    sd = _encoder_state(0)
    torch.save({"state_dict": {f"encoder_q.{k}": v for k, v in sd.items()}, "config": {}}, tmp_path / "own.pt")
    torch.save({"epoch": 3, "arch": "drasclr", "state_dict": {
        **{f"module.encoder_q.{k}": v for k, v in sd.items()},
        **{f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in sd.items()},
        "module.queue": torch.randn(128, 4, 3)}}, tmp_path / "published.pt")
    torch.save(sd, tmp_path / "bare.pt")
    digests = {fp.encoder_digest(tmp_path / f"{name}.pt") for name in ("own", "published", "bare")}
    assert digests == {fp.state_digest(sd)} and len(digests.pop()) == fp.DIGEST_CHARS


def test_digest_changes_with_any_tensor_and_only_the_encoder(tmp_path):
    sd = _encoder_state(0)
    base = fp.state_digest(sd)
    assert fp.state_digest(_encoder_state(0)) == base  # deterministic
    for name in ("conv1.weight", "fc.2.bias", "bn1.running_var"):
        changed = {k: v.clone() for k, v in sd.items()}
        changed[name].view(-1)[-1] += 1e-6  # one value (the last), barely
        assert fp.state_digest(changed) != base, name
    renamed = {(k + "2" if k == "fc.2.bias" else k): v for k, v in sd.items()}  # same order, other name
    assert fp.state_digest(renamed) != base  # names enter
    zeros = torch.zeros(6, dtype=torch.float32)
    assert len({fp.state_digest({"w": t}) for t in (zeros, zeros.view(2, 3), zeros.view(torch.int32))}) == 3
    assert fp.state_digest({**sd, "note": "not a tensor"}) == base
    assert fp.state_digest({"w": torch.ones(3, dtype=torch.bfloat16)}) != fp.state_digest({"w": torch.ones(3)})
    # the key encoder and the queue of a training checkpoint do not enter: only what load_encoder reads
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"state_dict": {**{f"encoder_q.{k}": v for k, v in sd.items()}, "queue": torch.zeros(2)}}, a)
    torch.save({"state_dict": {**{f"encoder_q.{k}": v for k, v in sd.items()}, "queue": torch.ones(2)}}, b)
    assert fp.encoder_digest(a) == fp.encoder_digest(b) == base


def test_file_digest_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    torch.save(_encoder_state(0), path)
    first = fp.encoder_digest(path)
    monkeypatch.setattr(fp, "_read_checkpoint", lambda *a: pytest.fail("read again"))
    assert fp.encoder_digest(path) == first  # cached
    monkeypatch.undo()
    torch.save(_encoder_state(1), path)  # new weights, same path
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fp.encoder_digest(path) != first
    with pytest.raises(FileNotFoundError):
        fp.encoder_digest(tmp_path / "absent.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="no encoder weights"):
        fp.encoder_digest(tmp_path / "foreign.pt")


def test_store_digest_follows_content_not_folder(tmp_path):
    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.testing import make_toy_store

    a = make_toy_store(tmp_path / "a", n_subjects=3, grid=(2, 1, 1))
    b = make_toy_store(tmp_path / "b", n_subjects=3, grid=(2, 1, 1))
    assert fp.store_digest(a) == fp.store_digest(PatchStore(b))  # the same content in two folders
    assert fp.store_digest(make_toy_store(tmp_path / "c", n_subjects=4, grid=(2, 1, 1))) != fp.store_digest(a)
    assert fp.store_digest(make_toy_store(tmp_path / "d", n_subjects=3, grid=(3, 1, 1))) != fp.store_digest(a)
    table = a / "subjects.csv"
    table.write_text(table.read_text().replace("toy001", "toy00X"))  # rebuilt: other subjects or values
    assert fp.store_digest(a) != fp.store_digest(b)
    assert fp.store_digest(tmp_path / "not_a_store") is None
