"""hico_jax.data.video against VideoChat-Flash's `llava/video_utils.py` and `UMTImageProcessor`.

Frame choice is checked against a loop-by-loop numpy transcription of the reference `get_frame_indices` and
`read_frames_decord`'s span arithmetic, written here independently of the module. Decoding is checked on
real mp4v files whose every frame carries its own index as a 12-bit pattern of black/white blocks, so a
frame off by one anywhere reads back wrong.
"""

import logging
import math
import struct

import cv2
import numpy as np
import pytest
from PIL import Image

from hico_jax.data import video
from hico_jax.data.video import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VideoDecodeError,
    decode_frames,
    frame_indices,
    preprocess,
)

# ----------------------------------------------------------------------------------------------------------
# The reference, transcribed (upstream OpenGVLab/VideoChat-Flash, llava-train_videochat/llava/video_utils.py)
# ----------------------------------------------------------------------------------------------------------


def reference_get_frame_indices(num_frames, vlen, sample, input_fps, min_num_frames, max_num_frames,
                                local_num_frames):
    """get_frame_indices for sample in {"dynamic_fps1", "middle"}, fix_start=None, step by step."""
    if min_num_frames > vlen:
        if sample == "dynamic_fps1":
            min_num_frames = (vlen // local_num_frames) * local_num_frames
        else:
            min_num_frames = vlen
    if sample == "dynamic_fps1":
        duration = float(vlen) / input_fps
        num_segments = int(duration // local_num_frames)
        if num_segments == 0:
            num_frames = local_num_frames
        else:
            num_frames = local_num_frames * num_segments
        if max_num_frames > 0:
            num_frames = min(num_frames, max_num_frames)
    num_frames = max(min_num_frames, num_frames)
    acc_samples = min(num_frames, vlen)
    intervals = np.linspace(start=0, stop=vlen, num=acc_samples + 1).astype(int)
    ranges = []
    for k in range(acc_samples):
        ranges.append((int(intervals[k]), int(intervals[k + 1]) - 1))
    chosen = [(lo + hi) // 2 for lo, hi in ranges]
    while len(chosen) < num_frames:
        chosen.append(chosen[-1])
    return chosen


def reference_clip(vlen, fps, start, end):
    """read_frames_decord with clip=(start, end): (span frames, first frame, span seconds)."""
    duration = vlen / float(fps)
    start = max(0, start)
    end = min(duration - 0.1, end)
    duration = end - start
    return int(duration * fps), int(start * fps), duration


def reference_indices(vlen, fps, start=None, end=None, *, mode="dynamic_fps1", num_frames=None,
                      min_frames=1, max_frames=-1, clip_frames=4):
    first = 0
    if start is not None or end is not None:
        vlen, first, _ = reference_clip(vlen, fps, 0.0 if start is None else start,
                                        math.inf if end is None else end)
    chosen = reference_get_frame_indices(num_frames, vlen, mode, fps, min_frames, max_frames, clip_frames)
    return [c + first for c in chosen]


# ----------------------------------------------------------------------------------------------------------
# frame_indices
# ----------------------------------------------------------------------------------------------------------

GRID_VLENS = sorted(set(range(1, 40)) | {63, 64, 65, 99, 100, 101, 127, 128, 129, 239, 240, 255, 256, 257,
                                         299, 300, 301, 480, 511, 512, 513, 600, 719, 720, 999, 1000})
GRID_FPS = (1, 10, 24, 29.97, 30, 60)
MIN_MAX = ((1, -1), (1, 8), (64, 512), (4, -1))


@pytest.mark.parametrize("min_frames,max_frames", MIN_MAX)
@pytest.mark.parametrize("clip_frames", (4, 8))
def test_dynamic_fps1_indices_equal_reference_transcription_on_grid(min_frames, max_frames, clip_frames):
    for vlen in GRID_VLENS:
        for fps in GRID_FPS:
            got = frame_indices(vlen, fps, mode="dynamic_fps1", min_frames=min_frames, max_frames=max_frames,
                                clip_frames=clip_frames)
            want = reference_get_frame_indices(None, vlen, "dynamic_fps1", fps, min_frames, max_frames,
                                               clip_frames)
            np.testing.assert_array_equal(got, want, err_msg=f"vlen={vlen} fps={fps}")
            assert got.dtype == np.int64


@pytest.mark.parametrize("min_frames,max_frames", MIN_MAX)
@pytest.mark.parametrize("num_frames", (1, 4, 7, 16, 64, 512))
def test_middle_indices_equal_reference_transcription_on_grid(min_frames, max_frames, num_frames):
    for vlen in GRID_VLENS:
        for fps in GRID_FPS:
            got = frame_indices(vlen, fps, mode="middle", num_frames=num_frames, min_frames=min_frames,
                                max_frames=max_frames)
            want = reference_get_frame_indices(num_frames, vlen, "middle", fps, min_frames, max_frames, 4)
            np.testing.assert_array_equal(got, want, err_msg=f"vlen={vlen} fps={fps}")


def test_frame_indices_hand_checked_cases():
    # 10 min at 30 fps = 18000 frames, 600 s: 4*floor(600/4) = 600 frames at 1 fps, capped by max 512.
    # Segment edges are linspace(0, 18000, 513) = k*35.15625 truncated: first middle (0+34)//2 = 17,
    # second (35+69)//2 = 52, last (17964+17999)//2 = 17981.
    idx = frame_indices(18000, 30, min_frames=64, max_frames=512)
    assert len(idx) == 512 and list(idx[:2]) == [17, 52] and idx[-1] == 17981
    # Without the cap all 600 stay; edges are exact multiples of 30: 14, 44, ..., (17970+17999)//2 = 17984.
    idx = frame_indices(18000, 30, min_frames=64, max_frames=-1)
    np.testing.assert_array_equal(idx, np.arange(600) * 30 + 14)
    # 3 s (90 frames): floor(3/4) = 0 clips, so n = 4. Edges [0, 22.5, 45, 67.5, 90] -> [0, 22, 45, 67, 90].
    np.testing.assert_array_equal(frame_indices(90, 30), [10, 33, 55, 78])
    # min 64 > 10 frames: the floor drops to 4*floor(10/4) = 8; n = max(8, 4) = 8.
    # Edges linspace(0, 10, 9) truncated = [0, 1, 2, 3, 5, 6, 7, 8, 10].
    np.testing.assert_array_equal(frame_indices(10, 30, min_frames=64, max_frames=512), [0, 1, 2, 3, 5, 6, 7, 8])
    # 3 frames, n = 4: three segments of one frame, padded with the last one.
    np.testing.assert_array_equal(frame_indices(3, 30), [0, 1, 2, 2])
    np.testing.assert_array_equal(frame_indices(1, 30), [0, 0, 0, 0])
    # 3 frames with min 64: the floor drops to 0, n = 4 still.
    np.testing.assert_array_equal(frame_indices(3, 30, min_frames=64, max_frames=512), [0, 1, 2, 2])
    # 29.97 fps: 240 frames = 8.008 s -> 8 frames; 239 frames = 7.975 s -> 4 frames.
    assert len(frame_indices(240, 29.97)) == 8 and len(frame_indices(239, 29.97)) == 4
    # 100 frames at 0.5 fps = 200 s -> 200 frames asked, 100 exist: every frame, then 100 copies of the last.
    idx = frame_indices(100, 0.5)
    np.testing.assert_array_equal(idx, list(range(100)) + [99] * 100)
    # middle, 8 of 100: edges 0, 12, 25, 37, 50, 62, 75, 87, 100.
    np.testing.assert_array_equal(frame_indices(100, 30, mode="middle", num_frames=8),
                                  [5, 18, 30, 43, 55, 68, 80, 93])
    # middle with min 16 > 5 frames: the floor becomes vlen = 5, n = max(5, 8) = 8, padded.
    np.testing.assert_array_equal(frame_indices(5, 30, mode="middle", num_frames=8, min_frames=16),
                                  [0, 1, 2, 3, 4, 4, 4, 4])
    # dynamic_fps1 ignores num_frames, as the reference overwrites it.
    np.testing.assert_array_equal(frame_indices(90, 30, num_frames=64), [10, 33, 55, 78])


def test_frame_indices_rejects_what_the_reference_crashes_on():
    with pytest.raises(ValueError, match="0 frames"):
        frame_indices(0, 30)
    with pytest.raises(ValueError, match="num_frames"):
        frame_indices(100, 30, mode="middle")
    with pytest.raises(ValueError, match="mode"):
        frame_indices(100, 30, mode="rand")
    with pytest.raises(ValueError, match="fps"):
        frame_indices(100, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Test videos: frame i shows i in binary (12 blocks of 16x16, black or white) and a red 16-pixel strip
# ----------------------------------------------------------------------------------------------------------

BLOCK, ROWS, COLS = 16, 3, 4
H, W = ROWS * BLOCK, COLS * BLOCK + BLOCK  # the last column is the red strip


def index_frame_bgr(i):
    f = np.zeros((H, W, 3), np.uint8)
    for bit in range(ROWS * COLS):
        r, c = divmod(bit, COLS)
        if (i >> bit) & 1:
            f[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK] = 255
    f[:, COLS * BLOCK:] = (0, 0, 255)  # BGR red
    return f


def read_index(frame_rgb):
    gray = frame_rgb[:, :COLS * BLOCK].mean(axis=2)
    i = 0
    for bit in range(ROWS * COLS):
        r, c = divmod(bit, COLS)
        core = gray[r * BLOCK + 4:(r + 1) * BLOCK - 4, c * BLOCK + 4:(c + 1) * BLOCK - 4]
        i |= int(core.mean() > 127) << bit
    return i


def write_mp4(path, n_frames, fps):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (W, H))
    assert w.isOpened()
    for i in range(n_frames):
        w.write(index_frame_bgr(i))
    w.release()
    return path


def faststart(mp4):
    """The same mp4 with its index (moov) moved before the data, chunk offsets shifted to match."""
    moov_at, mdat_at = mp4.find(b"moov") - 4, mp4.find(b"mdat") - 4
    assert mdat_at < moov_at and struct.unpack(">I", mp4[moov_at:moov_at + 4])[0] == len(mp4) - moov_at
    moov = bytearray(mp4[moov_at:])
    stco = moov.find(b"stco")
    (count,) = struct.unpack(">I", moov[stco + 8:stco + 12])
    for k in range(count):
        at = stco + 12 + 4 * k
        moov[at:at + 4] = struct.pack(">I", struct.unpack(">I", moov[at:at + 4])[0] + len(moov))
    return mp4[:mdat_at] + bytes(moov) + mp4[mdat_at:moov_at]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    out = {"d": d,
           "v30": write_mp4(d / "ten_seconds_30fps.mp4", 300, 30.0),
           "ntsc": write_mp4(d / "twenty_seconds_2997fps.mp4", 600, 29.97)}
    for key in ("v30", "ntsc"):
        out[key + "_bytes"] = out[key].read_bytes()
    return out


def assert_frames_are(frames, info, expected):
    np.testing.assert_array_equal(info["indices"], expected)
    assert frames.dtype == np.uint8 and frames.shape == (len(expected), H, W, 3)
    assert [read_index(f) for f in frames] == list(expected)
    strip = frames[:, 4:-4, COLS * BLOCK + 4:-4].reshape(-1, 3).mean(axis=0)
    assert strip[0] > 200 and strip[2] < 60, f"not RGB: strip mean {strip}"


# ----------------------------------------------------------------------------------------------------------
# decode_frames
# ----------------------------------------------------------------------------------------------------------

SAMPLINGS = {
    "dynamic_default": dict(),
    "dynamic_64_512": dict(min_frames=64, max_frames=512),
    "dynamic_1_8": dict(min_frames=1, max_frames=8),
    "middle_16": dict(mode="middle", num_frames=16),
    "middle_500_pads": dict(mode="middle", num_frames=500),
}


@pytest.mark.parametrize("as_bytes", (False, True), ids=("path", "bytes"))
@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
def test_decoded_frames_are_the_reference_indices_of_the_whole_video(videos, sampling, as_bytes):
    for key, vlen, fps in (("v30", 300, 30.0), ("ntsc", 600, 29.97)):
        src = videos[key + "_bytes"] if as_bytes else videos[key]
        frames, info = decode_frames(src, **sampling)
        assert_frames_are(frames, info, reference_indices(vlen, fps, **sampling))
        assert info["vlen"] == vlen and info["fps"] == pytest.approx(fps)
        assert info["duration"] == pytest.approx(vlen / fps)


SPANS = [
    (2.5, 7.9),      # inside: 162 frames from frame 75
    (6.0, 100.0),    # end clamped to duration - 0.1 = 9.9 s
    (-3.0, 4.0),     # start clamped to 0
    (0.0, 0.5),      # under one clip: 15 frames, 4 sampled
    (9.0, 9.95),     # end just past duration - 0.1: clamped
    (9.0, 9.85),     # end just inside duration - 0.1
    (3.0, None),     # no end: to duration - 0.1
    (None, 5.0),     # no start: from 0
]


@pytest.mark.parametrize("as_bytes", (False, True), ids=("path", "bytes"))
@pytest.mark.parametrize("start,end", SPANS)
def test_span_frames_follow_read_frames_decord_clip_rules(videos, start, end, as_bytes):
    src = videos["v30_bytes"] if as_bytes else videos["v30"]
    for sampling in (dict(), dict(min_frames=8, max_frames=64), dict(mode="middle", num_frames=12)):
        frames, info = decode_frames(src, start=start, end=end, **sampling)
        assert_frames_are(frames, info, reference_indices(300, 30.0, start, end, **sampling))
        _, _, span_seconds = reference_clip(300, 30.0, 0.0 if start is None else start,
                                            math.inf if end is None else end)
        assert info["duration"] == pytest.approx(span_seconds)


def test_bytes_go_through_a_temporary_file_where_opencv_cannot_read_streams(videos, monkeypatch, tmp_path):
    monkeypatch.setattr(video, "_stream_reading_supported", lambda: False)
    monkeypatch.setattr(video, "_TMP_DIR", str(tmp_path))
    frames, info = decode_frames(videos["v30_bytes"], start=1.0, end=6.0)
    assert_frames_are(frames, info, reference_indices(300, 30.0, 1.0, 6.0))
    with pytest.raises(VideoDecodeError, match=r"<bytes len=5000>"):
        decode_frames(np.random.default_rng(1).bytes(5000))
    assert list(tmp_path.iterdir()) == []  # cleaned up, also after the failure


def test_span_hand_checked(videos):
    # 10 s at 30 fps, start 2.5 end 7.9: 5.4 s -> int(5.4 * 30) = 162 frames from int(2.5 * 30) = 75;
    # 5.4 s -> 4 frames at 1 fps; edges [0, 40, 81, 121, 162] -> middles 19, 60, 100, 141, + 75.
    frames, info = decode_frames(videos["v30"], start=2.5, end=7.9)
    assert_frames_are(frames, info, [94, 135, 175, 216])
    # start 6, end 100: end -> 9.9, (9.9 - 6) * 30 = 117.00000000000001 -> 117 frames from 180.
    frames, info = decode_frames(videos["v30"], start=6.0, end=100.0, mode="middle", num_frames=3)
    assert_frames_are(frames, info, [180 + 19, 180 + 58, 180 + 97])


def test_seeking_to_a_late_span_gives_the_frames_of_a_decode_from_frame_zero(videos, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger=video.__name__)
    for src in (videos["ntsc"], videos["ntsc_bytes"]):
        monkeypatch.setattr(video, "_SEEK_MIN_FRAMES", 10**9)
        sequential, _ = decode_frames(src, start=12.0, end=15.5, min_frames=8)
        assert "seeked" not in caplog.text
        monkeypatch.setattr(video, "_SEEK_MIN_FRAMES", 16)
        frames, info = decode_frames(src, start=12.0, end=15.5, min_frames=8)
        assert "seeked to frame" in caplog.text and "decoding from frame 0" not in caplog.text
        caplog.clear()
        np.testing.assert_array_equal(frames, sequential)
        assert_frames_are(frames, info, reference_indices(600, 29.97, 12.0, 15.5, min_frames=8))


def test_a_seek_off_the_timestamp_grid_falls_back_to_decoding_from_frame_zero(videos, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger=video.__name__)
    monkeypatch.setattr(video, "_SEEK_MIN_FRAMES", 16)
    monkeypatch.setattr(video, "_on_grid", lambda cap, index, fps: False)  # as a VFR file would look
    frames, info = decode_frames(videos["ntsc_bytes"], start=12.0, end=15.5, min_frames=8)
    assert "decoding from frame 0" in caplog.text
    assert_frames_are(frames, info, reference_indices(600, 29.97, 12.0, 15.5, min_frames=8))


@pytest.mark.parametrize("declared", (None, 300 + 7, 300 - 9, 240, 301), ids=("none", "high", "low", "much_low",
                                                                             "one_high"))
def test_a_wrong_container_frame_count_is_replaced_by_the_decoded_count(videos, monkeypatch, declared):
    monkeypatch.setattr(video, "_frame_count_hint", lambda cap: declared)
    cases = [(None, None, dict()), (None, None, dict(min_frames=64, max_frames=512)),
             (2.0, 9.8, dict()), (2.0, 9.95, dict()), (1.0, 8.0, dict(min_frames=8)), (4.0, None, dict())]
    for start, end, sampling in cases:
        frames, info = decode_frames(videos["v30_bytes"], start=start, end=end, **sampling)
        assert_frames_are(frames, info, reference_indices(300, 30.0, start, end, **sampling))


def test_a_video_far_shorter_than_declared_is_reported_truncated(videos, monkeypatch):
    monkeypatch.setattr(video, "_frame_count_hint", lambda cap: 1000)
    with pytest.raises(VideoDecodeError, match=r"<bytes len=\d+>.*truncated.*1000 frames, only 300"):
        decode_frames(videos["v30_bytes"])


def bad_inputs(videos):
    d, mp4 = videos["d"], videos["v30_bytes"]
    no_frames = d / "writer_released_without_frames.mp4"
    w = cv2.VideoWriter(str(no_frames), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (W, H))
    w.release()
    mdat = mp4.find(b"mdat") + 4
    (mdat_size,) = struct.unpack(">I", mp4[mdat - 8:mdat - 4])
    blank_data = mp4[:mdat] + bytes(mdat_size - 8) + mp4[mdat - 8 + mdat_size:]  # index intact, frames zeroed
    fast = faststart(mp4)
    (d / "half.mp4").write_bytes(mp4[:len(mp4) // 2])
    (d / "empty.mp4").write_bytes(b"")
    return {
        "missing_file": (d / "does_not_exist.mp4", "does_not_exist.mp4.*no such file"),
        "empty_file": (d / "empty.mp4", "empty.mp4.*empty"),
        "random_bytes": (np.random.default_rng(0).bytes(20_000), r"<bytes len=20000>.*cannot open"),
        "empty_bytes": (b"", r"<bytes len=0>.*empty"),
        "half_file": (d / "half.mp4", "half.mp4.*cannot open"),
        "half_bytes": (mp4[:len(mp4) // 2], rf"<bytes len={len(mp4) // 2}>.*cannot open"),
        "zero_frame_file": (no_frames, "writer_released_without_frames.mp4.*cannot open"),
        "index_but_no_decodable_frame": (blank_data, rf"<bytes len={len(blank_data)}>.*no frame decodes"),
        "faststart_cut_in_half": (fast[:len(fast) // 2], r"truncated.*declares 300 frames, only \d+ decode"),
    }


BAD = ("missing_file", "empty_file", "random_bytes", "empty_bytes", "half_file", "half_bytes", "zero_frame_file",
       "index_but_no_decodable_frame", "faststart_cut_in_half")


@pytest.mark.parametrize("case", BAD)
def test_bad_video_raises_video_decode_error_naming_the_source(videos, case):
    source, pattern = bad_inputs(videos)[case]
    with pytest.raises(VideoDecodeError, match=pattern) as e:
        decode_frames(source)
    assert isinstance(e.value, ValueError)


def test_faststart_copy_decodes_like_the_original(videos):
    # Guards the truncation case above: the rewritten file itself is fine.
    frames, info = decode_frames(faststart(videos["v30_bytes"]))
    assert_frames_are(frames, info, reference_indices(300, 30.0))


def test_span_without_frames_raises(videos):
    with pytest.raises(VideoDecodeError, match="ten_seconds_30fps.mp4.*holds no frames"):
        decode_frames(videos["v30"], start=20.0, end=30.0)
    with pytest.raises(ValueError, match="num_frames"):
        decode_frames(videos["v30"], mode="middle")


# ----------------------------------------------------------------------------------------------------------
# Resizing as frames are decoded, progress, probe
# ----------------------------------------------------------------------------------------------------------

RESIZE_CASES = {
    "whole_video": dict(),
    "repeats_last_frame": dict(mode="middle", num_frames=500),
    "span": dict(start=2.5, end=7.9, min_frames=8),
    "late_span_seeks": dict(start=9.0, end=9.85, min_frames=8),     # frame 270 >= _SEEK_MIN_FRAMES
}


@pytest.mark.parametrize("as_bytes", (False, True), ids=("path", "bytes"))
@pytest.mark.parametrize("case", RESIZE_CASES.values(), ids=RESIZE_CASES.keys())
def test_resizing_each_frame_as_it_is_decoded_equals_decoding_then_resize_frames(videos, case, as_bytes):
    src = videos["v30_bytes"] if as_bytes else videos["v30"]
    full, full_info = decode_frames(src, **case)
    for size in (32, 112):   # 48x80 frames: shrunk (antialiased) and enlarged, the aspect ratio not kept
        frames, info = decode_frames(src, size=size, **case)
        assert frames.dtype == np.uint8 and frames.shape == (len(full), size, size, 3)
        np.testing.assert_array_equal(frames, video.resize_frames(full, size))
        np.testing.assert_array_equal(info.pop("indices"), full_info["indices"])
        assert info == {k: v for k, v in full_info.items() if k != "indices"}


def test_decoding_with_a_size_holds_one_full_size_frame_at_a_time(tmp_path):
    """16 frames of 640x360 kept from 64: decoded at full size they need 16 x 691 KB; resized as they come,
    the decode's peak allocation (numpy's, OpenCV's frames included) stays near the one frame being resized."""
    tracemalloc = pytest.importorskip("tracemalloc")
    path, height, width = str(tmp_path / "wide.mp4"), 360, 640
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (width, height))
    rng = np.random.default_rng(0)
    for _ in range(64):
        writer.write(cv2.resize(rng.integers(0, 256, (9, 16, 3), dtype=np.uint8), (width, height)))
    writer.release()
    frame_bytes = height * width * 3

    def peak(**kwargs):
        tracemalloc.start()
        try:
            decode_frames(path, mode="middle", num_frames=16, **kwargs)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak() > 16 * frame_bytes            # the measurement sees numpy's and OpenCV's frames
    assert peak(size=64) < 1.5 * frame_bytes


def test_progress_reports_every_few_frames_up_to_the_frames_each_pass_reads(videos, monkeypatch):
    calls = []
    decode_frames(videos["v30"], progress=lambda passed, expected: calls.append((passed, expected)))
    assert calls[-1] == (300, 300) and len(calls) >= 300 // 32
    assert all(a[0] < b[0] and a[1] == b[1] == 300 for a, b in zip(calls, calls[1:]))
    # A span ending inside the video reads just past its last sampled frame: 2.5-7.9 s ends by frame 237.
    calls.clear()
    frames, info = decode_frames(videos["v30"], start=2.5, end=7.9, progress=lambda *c: calls.append(c))
    assert calls[-1][0] == calls[-1][1] and info["indices"][-1] < calls[-1][0] <= 300
    # No frame count in the container: a counting pass (total unknown until its end), then the sampling pass,
    # which knows the count and stops at the last sampled frame (8 frames at 1 fps: middles up to 280).
    monkeypatch.setattr(video, "_frame_count_hint", lambda cap: None)
    calls.clear()
    decode_frames(videos["v30"], progress=lambda *c: calls.append(c))
    counted = calls.index((300, 300))
    assert counted > 0 and all(expected is None for _, expected in calls[:counted])
    assert calls[-1] == (281, 281) and all(expected == 281 for _, expected in calls[counted + 1:])


def test_probe_reads_the_first_frame_only_and_refuses_what_decode_frames_refuses_to_open(videos):
    assert video.probe(videos["ntsc"]) == dict(fps=pytest.approx(29.97), declared_frames=600, height=H, width=W)
    assert video.probe(videos["v30_bytes"])["declared_frames"] == 300
    cases = bad_inputs(videos)
    for case in BAD:
        source, pattern = cases[case]
        if case == "faststart_cut_in_half":     # its first frames are intact: only a full decode finds the cut
            assert video.probe(source)["declared_frames"] == 300
            continue
        with pytest.raises(VideoDecodeError, match=pattern.split(".*")[0]):
            video.probe(source)


def test_a_size_that_is_not_a_positive_integer_is_refused(videos):
    for size in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="size must be a positive number of pixels"):
            decode_frames(videos["v30"], size=size)


# ----------------------------------------------------------------------------------------------------------
# preprocess
# ----------------------------------------------------------------------------------------------------------


def random_frames(t, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_preprocess_shape_and_dtype():
    out = preprocess(random_frames(3, 30, 50), 16)
    assert out.shape == (3, 16, 16, 3) and out.dtype == np.float32


def test_preprocess_equals_pillow_bicubic_then_imagenet_normalisation_on_a_non_square_frame():
    frames = random_frames(2, 45, 80, seed=1)  # shrinks 80 -> 32 and 45 -> 32: no aspect kept, no crop
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    for size in (32, 112):  # down and up
        want = np.stack([
            (np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC), np.float64) / 255.0 - mean) / std
            for f in frames])
        np.testing.assert_allclose(preprocess(frames, size), want, rtol=0, atol=2e-6)
    # Pillow's bicubic antialiases when it shrinks; OpenCV's does not. The test above would see the swap.
    cv_small = cv2.resize(frames[0], (32, 32), interpolation=cv2.INTER_CUBIC)
    assert np.abs(cv_small.astype(float) - np.asarray(Image.fromarray(frames[0]).resize((32, 32),
                                                                                     Image.BICUBIC))).max() > 20


def test_preprocess_is_bit_identical_to_the_transformers_steps_umt_image_processor_runs():
    transforms = pytest.importorskip("transformers.image_transforms")
    from transformers.image_utils import ChannelDimension, PILImageResampling

    first = ChannelDimension.FIRST
    frames = random_frames(2, 37, 61, seed=2)
    for size in (16, 96):
        want = []
        for f in frames:
            x = transforms.resize(f, size=(size, size), resample=PILImageResampling.BICUBIC, data_format=first)
            x = transforms.rescale(x, scale=1 / 255, data_format=first)
            x = transforms.normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD, data_format=first)
            want.append(x.transpose(1, 2, 0))
        np.testing.assert_array_equal(preprocess(frames, size), np.stack(want))


def test_preprocess_normalises_each_channel_with_its_own_constants():
    rgb = (10, 128, 250)
    frames = np.broadcast_to(np.array(rgb, np.uint8), (1, 20, 30, 3)).copy()
    out = preprocess(frames, 8)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], (rgb[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], atol=1e-6)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_preprocess_rejects_non_uint8_or_wrong_layout():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((1, 8, 8, 3), np.float32), 4)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        preprocess(np.zeros((8, 8, 3), np.uint8), 4)
