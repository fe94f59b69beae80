"""fasthg.bench.traffic: the BN-ReLU-conv1x1 unit's bytes, checked by hand at one level."""
import pytest

from fasthg.bench import report, traffic


def test_one_level_by_hand():
    """64x64, batch 16, 256 -> 128 channels, bf16: P = 65536 pixels, x = P*256*2 B, y = P*128*2 B,
    the weight 256*128*2 B; 1024 tiles of 64 rows, 7 a program forward (1024*2 tiles // 264:
    147 programs), 15 backward (1024*4 // 264: 69 programs); 32 weight-gradient splits
    (min(4*132/8, P/2048))."""
    b = traffic.bn_relu_conv1x1_bytes(16, 64, 64, 256, 128, 2)
    x, y, w = 33_554_432, 16_777_216, 65_536
    stats_parts = 147 * 2 * 128 * 8 * 2
    assert b["unfused forward"] == 4 * x + 2 * y + w == 167_837_696
    assert b["fused forward"] == x + y + w + stats_parts == 50_999_296
    assert b["unfused backward"] == 7 * x + 3 * y + 2 * w
    partials = 69 * 2 * 256 * 8 * 2 + 32 * (256 * 128 + 128) * 4 * 2
    assert b["fused backward partials"] == partials
    assert b["fused backward"] == 4 * x + 3 * y + 3 * w + partials
    assert b["fused eval backward"] == 3 * x + 2 * y + 2 * w + partials
    # the native CPU unit: x's statistics pass and one walk forward; backward one walk writing
    # g, then BN-ReLU's elementwise pass (on AMX a second walk, in place)
    assert b["native forward"] == 2 * x + y + w
    assert b["native backward"] == 5 * x + y + w


def test_time_bound_and_table():
    (row,) = [r for r in traffic.rows(16, levels=(64,), itemsizes=(2,)) if r["cin"] == 256]
    assert row["fwd_us"][1] == pytest.approx(50_999_296 / 4.0e12 * 1e6)
    text = traffic.table(16)
    assert text.count("\n") == 2 + 2 * len(traffic.LEVELS) * len(traffic.UNITS)
    assert "| bf16 | 64x64 | 256->128 | 167.84 | 51.00 | 3.29x |" in text


def test_the_report_carries_the_table():
    result = {"device": "cpu", "torch": "x", "allocator": "a", "copy_gb_s": 1.0, "rows": []}
    assert "BN-ReLU-conv1x1 unit, compulsory bytes" in report.table(result)


def test_tile_constants_match_the_kernels():
    conv1x1 = pytest.importorskip("fasthg.kernels.conv1x1")
    assert (traffic.TILE_ROWS, traffic.SPLIT_ROWS) == (conv1x1.BM, conv1x1.MIN_SPLIT_ROWS)
    assert conv1x1.BN == conv1x1.BM == 64  # the weight gradient's 64x64 output tiles
    for args in ((1024, 2, 132), (16, 4, 132), (100000, 2, 132), (4096, 4, 132)):
        assert traffic.tiles_per_program(*args) == conv1x1.tiles_per_program(*args)
