"""The per-layer bounds run their small linear algebra on one thread and give the threads back."""

import torch
from torch import nn

from lipgan.analysis import conv as conv_mod
from lipgan.analysis import convgram
from lipgan.analysis.convmap import one_thread, outer_threads
from lipgan.analysis.operators import layer_bound


def test_one_thread_nests_and_outer_threads_restores_the_callers_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
            with one_thread():
                with outer_threads():
                    assert torch.get_num_threads() == 2
                assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_conv_bounds_run_small_work_on_one_thread_and_the_large_cholesky_on_all(monkeypatch):
    seen = {"freq": [], "chol": []}
    real_top, real_chol = conv_mod._top_sq, convgram.certified_max_eig
    monkeypatch.setattr(
        conv_mod, "_top_sq", lambda m: seen["freq"].append(torch.get_num_threads()) or real_top(m)
    )

    def chol(build, certifies, estimate, delta):
        A, _fro = build()  # the block-sparse slots (n_slots, m, m) above CHOL_LIMIT
        seen["chol"].append((A.shape[0] * A.shape[1] ** 2, torch.get_num_threads()))
        return real_chol(build, certifies, estimate, delta)

    monkeypatch.setattr(convgram, "certified_max_eig", chol)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        layer = nn.Conv2d(8, 16, 3, stride=2, padding=1).double()
        b = layer_bound(layer, (8, 16, 16), dense_limit=0, lower=False, chol_limit=0)
        assert b.method == "freq" and seen["freq"] and set(seen["freq"]) == {1}
        layer = nn.Conv2d(64, 48, 3, padding=1).double()  # output side 48 * 49 = 2352 > 2048
        b = layer_bound(layer, (64, 7, 7), dense_limit=0, lower=False)
        assert b.method == "chol" and seen["chol"][-1][1] == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
