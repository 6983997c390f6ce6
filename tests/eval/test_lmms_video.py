"""Video files in lmms-eval tasks (doc_to_visual gives a path): decoded with PyAV, frames sampled
uniformly (epic_ext/eval/video.py), answered by the Qwen-VL families with a method as the same
frames given directly; a video for LLaVA is a clear error.

Skipped where lmms-eval (which installs PyAV) is not installed.
"""
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lmms_eval")
av = pytest.importorskip("av")

from epic_ext.eval.video import Video, read_video, sample_indices  # noqa: E402

N_FRAMES, RATE, SIZE = 20, 10, 64


def _level(i: int) -> int:
    return 20 + 10 * i


@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> Path:
    """N_FRAMES frames at RATE fps; frame i is flat grey at _level(i), with a white square that
    moves (so frames differ in content, not only in level)."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=RATE)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(N_FRAMES):
            frame = np.full((SIZE, SIZE, 3), _level(i), np.uint8)
            frame[8:16, 2 * i:2 * i + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from epic_ext.models import tiny
    from epic_ext.models.tiny_qwen import save_tiny_qwen
    root = tmp_path_factory.mktemp("video_models")
    save_tiny_qwen("qwen2_5_vl", root / "qwen2_5_vl")
    tiny.save_tiny_llava(root / "llava")
    return root


@pytest.mark.parametrize("max_frames", [6, 8, 1, 50])
def test_frames_are_sampled_uniformly_over_the_video(video_file, max_frames):
    clip = read_video(video_file, max_frames)
    idx = np.unique(np.linspace(0, N_FRAMES - 1, min(max_frames, N_FRAMES)).astype(int))
    assert (sample_indices(N_FRAMES, max_frames) == idx).all()
    assert clip.frames.shape == (len(idx), SIZE, SIZE, 3) and clip.frames.dtype == np.uint8
    # the flat part of each frame is nearest the level of the frame it came from (levels 10
    # apart; mpeg4 + the YUV round trip move them by < 5)
    levels = clip.frames[:, 32:].reshape(len(idx), -1).mean(1)
    all_levels = np.array([_level(i) for i in range(N_FRAMES)])
    assert (np.abs(levels[:, None] - all_levels[None]).argmin(1) == idx).all()
    assert clip.fps == pytest.approx(len(idx) / (N_FRAMES / RATE))


def test_bad_video_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such video"):
        read_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="junk.mp4: not a readable video"):
        read_video(junk)
    with pytest.raises(ValueError, match="max_frames"):
        sample_indices(10, 0)
    with pytest.raises(ValueError, match="frames"):
        Video(np.zeros((0, 4, 4, 3), np.uint8), fps=1.0)


def _requests(path, image):
    from lmms_eval.api.instance import Instance
    docs = [{"video": str(path)}, {"image": True}, {"video": str(path)}]

    def to_visual(doc):
        return [doc["video"]] if "video" in doc else [image]
    gen = dict(max_new_tokens=4, until=["\n"])
    reqs = [Instance(request_type="generate_until", arguments=(f"What happens? {i}", gen, to_visual, i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i in range(len(docs))]
    return reqs, {"t": {"test": docs}}


def test_video_requests_answer_as_the_frames_given_directly(saved, video_file, one_thread):
    """A batch mixing video and image documents (Qwen2.5-VL, DART at 4 tokens per frame group)
    answers each as the runner does alone on the sampled frames; records count frame groups."""
    from PIL import Image

    from epic_ext.eval.lmms import EpicExt
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    requests, task_dict = _requests(video_file, image)
    model = EpicExt(str(saved / "qwen2_5_vl"), method="dart", keep=4, layer=1, device="cpu", batch_size=3,
                    max_frames=8)
    model.task_dict = task_dict
    got = [r.text for r in model.generate_until(requests)]
    records = sorted(model.records, key=lambda r: r["doc_id"])
    clip = read_video(video_file, 8)
    for i, rec in enumerate(records):
        visual = [clip] if i != 1 else [image]
        alone = model.runner.generate([requests[i].args[0]], [visual], max_new_tokens=4, until=["\n"])[0]
        assert got[i] == alone
        kinds = [u["kind"] for u in rec["units"]]
        assert kinds == (["video"] * (len(clip.frames) // 2) if i != 1 else ["image"])
        assert all(u["kept"] in (4, None) for u in rec["units"])
        assert rec["visual_tokens_per_layer"][-1] == 4 * len(kinds)
    with pytest.raises(ValueError, match="max_frames"):
        EpicExt(str(saved / "qwen2_5_vl"), device="cpu", max_frames=0)


def test_a_video_for_llava_is_a_clear_error(saved, video_file):
    from epic_ext.eval.lmms import EpicExt
    from PIL import Image
    requests, task_dict = _requests(video_file, Image.new("RGB", (32, 32)))
    model = EpicExt(str(saved / "llava"), device="cpu")
    model.task_dict = task_dict
    with pytest.raises(ValueError, match="visuals: a video for a llava model"):
        model.generate_until(requests[:1])
