import pytest

from farm.kinds.frames import SpecError, parse_frames, render_settings, split_blender


@pytest.mark.parametrize("spec, frames", [
    ("1", [1]), ("1-4", [1, 2, 3, 4]), ("1-24,30", list(range(1, 25)) + [30]),
    ("40-50x2", [40, 42, 44, 46, 48, 50]), ("3,1,2,2", [1, 2, 3]), (" 1 - 3 , 5 ", [1, 2, 3, 5]),
    ("-2-1", [-2, -1, 0, 1]),
])
def test_parse_frames(spec, frames):
    assert parse_frames(spec) == frames


@pytest.mark.parametrize("spec, why", [
    ("", "empty"), ("a-b", "is not N"), ("5-1", "ends before"), ("1-5x0", "step"), ("1-9999999", "more than"),
])
def test_bad_frames(spec, why):
    with pytest.raises(SpecError, match=why):
        parse_frames(spec)


def test_chunks():
    assert split_blender("1-5", 2) == [{"frames": [1, 2]}, {"frames": [3, 4]}, {"frames": [5]}]
    with pytest.raises(SpecError):
        split_blender("1-5", 0)


def test_settings_validation():
    assert render_settings("png", None)["color_depth"] == "8"
    assert render_settings("EXR")["color_depth"] == "16"
    for args in (("TIFF",), ("PNG", "32"), ("PNG", None, 0), ("PNG", None, None, 0)):
        with pytest.raises(SpecError):
            render_settings(*args)
