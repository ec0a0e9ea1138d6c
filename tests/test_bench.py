"""bench.py's demo reader: colour, shape and direction read back from rendered mp4s of known content."""

import numpy as np

import bench
import curate
import sample
import train


def demo_clip(rng, tmp_path, colour, shape, direction, name="c"):
    """A shot rendered as the demo's data is (curate.render_shot at train.DEMO_SOURCE), read the way training
    reads it (9 frames at the demo's stride and size), then written and read back as a sample's mp4."""
    cfg = train.PRESETS["demo"]
    H, W, T, _ = cfg.stages[-1].buckets[0]
    n = (T - 1) * cfg.frame_stride + 1
    frames = curate.render_shot(rng, *train.DEMO_SOURCE, n, shape, colour, direction,
                                size=train.DEMO_SHAPE_SIZE, travel=train.DEMO_SHAPE_TRAVEL)
    curate.write_video(str(tmp_path / "src.mp4"), frames)
    clip = train.read_clip(str(tmp_path / "src.mp4"), (H, W), 0, T, cfg.frame_stride)
    path = str(tmp_path / f"{name}.mp4")
    sample.write_mp4(clip.permute(1, 2, 3, 0).numpy(), path, fps=3)
    return bench.read_mp4(path)


def test_reader_reads_every_colour_shape_and_direction_of_true_renders(tmp_path):
    rng = np.random.default_rng(0)
    wrong = []
    for c, s, d in bench.GRAMMAR:
        got = bench.read_demo_video(demo_clip(rng, tmp_path, c, s, d))
        if (got["colour"], got["shape"], got["direction"], got["ghosts"]) != (c, s, d, 0):
            wrong.append((c, s, d, got))
    assert not wrong, wrong


def test_reader_finds_no_shape_on_a_bare_backdrop_and_counts_a_ghost(tmp_path):
    rng = np.random.default_rng(1)
    back = np.stack([curate.texture(rng, 64, 64)] * 9)
    assert bench.read_demo_video(back)["shape"] == "none"
    video = demo_clip(rng, tmp_path, "red", "square", "left").copy()
    for f in video:  # a second blob, a sixth the size, in a corner of every frame, clear of the shape
        curate.draw_shape(f, "circle", curate.COLOURS["green"], 7.5, 7.5, 7.5)
    got = bench.read_demo_video(video)
    assert got["ghosts"] == len(video) and got["shape"] == "square"
