"""2D image sets: PNG folders + label CSVs, DICOM windowing, into the `image` store."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image
from test_data_dicom import cli_error, write_series

from lungbench.cli import main
from lungbench.core.errors import DataError
from lungbench.data.images import dicom_to_png, dicom_to_uint8, read_label_csv, write_images_store
from lungbench.data.store import read_info, read_meta


def _png(path, value, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)


@pytest.fixture
def chestxray(tmp_path):
    for i, v in enumerate((10, 120, 250)):
        _png(tmp_path / "img" / f"0000{i}_000.png", v)
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text(
        "Image Index,Finding Labels,Follow-up #\n"
        "00000_000.png,Atelectasis|Effusion,0\n"
        "00001_000.png,No Finding,0\n"
        "00002_000.png, Hernia ,1\n"
    )
    return tmp_path


def test_chestxray_multilabel_round_trip(chestxray, tmp_path):
    out = tmp_path / "cxr.h5"
    assert (
        write_images_store(chestxray / "img", chestxray / "Data_Entry_2017.csv", out, size=(16, 16))
        == 3
    )
    info = read_info(out)
    assert info.task == "multilabel" and info.units["image"] == "uint8"
    assert info.inputs == {"image": (1, 16, 16)} and len(info.label_names) == 14
    labels = read_meta(out)["label"]
    assert labels[0].tolist() == [1, 0, 1] + [0] * 11
    assert labels[1].sum() == 0 and labels[2][13] == 1
    with h5py.File(out) as f:
        assert f["image"].dtype == np.uint8 and f["image"][2].min() == 250


def test_label_outside_list_is_an_error(chestxray):
    with pytest.raises(DataError, match=r"row 2: finding 'Effusion' is not in the label list"):
        read_label_csv(chestxray / "Data_Entry_2017.csv", labels=["Atelectasis", "Hernia"])


def test_binary_crops_via_cli(tmp_path):
    for i in range(4):
        _png(tmp_path / "crops" / f"c{i}.png", 60 * i, size=(64, 64))
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label\nc0.png,0\nc1.png,1\nc2.png,malignant\nc3.png,Benign\n")
    out = tmp_path / "crops.h5"
    assert (
        main(
            [
                "data",
                "images",
                str(tmp_path / "crops"),
                str(csv),
                "--size",
                "64",
                "64",
                "--channels",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    info = read_info(out)
    assert info.task == "binary" and info.inputs == {"image": (3, 64, 64)}
    assert list(read_meta(out)["label"]) == [0, 1, 1, 0]


def test_binary_label_outside_set(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label\nc0.png,2\n")
    with pytest.raises(DataError, match="labels.csv: row 2: label '2' is outside"):
        read_label_csv(csv)


def test_missing_image_leaves_no_store(tmp_path):
    _png(tmp_path / "crops" / "c0.png", 1)
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label\nc0.png,0\nmissing.png,1\n")
    out = tmp_path / "o.h5"
    with pytest.raises(DataError, match="missing.png: image file not found"):
        write_images_store(tmp_path / "crops", csv, out, size=(8, 8))
    assert list(tmp_path.glob("o.h5*")) == []


def test_dicom_window_to_8_bit_png(tmp_path):
    hu = np.array([[[-1000, -500, 0, 500]] * 4], np.int16)  # one 4x4 slice ... as a series
    hu = np.concatenate([hu, hu])
    write_series(tmp_path / "d", hu, names=["a.dcm", "b.dcm"])
    image = dicom_to_uint8(tmp_path / "d" / "a.dcm", window=(-1000, 0))
    assert image[0].tolist() == [0, 128, 255, 255]
    png = dicom_to_png(tmp_path / "d" / "a.dcm", tmp_path / "a.png", window=(-1000, 0))
    assert np.asarray(Image.open(png))[0].tolist() == [0, 128, 255, 255]


def test_no_file_column(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("name,label\na.png,0\n")
    with pytest.raises(DataError, match="x.csv: no image file column"):
        read_label_csv(csv)


@pytest.mark.parametrize("name", ["../secret.png", "/etc/passwd", "sub/../../x.png", "C:\\x.png"])
def test_file_names_outside_the_folder_are_rejected(tmp_path, name):
    _png(tmp_path / "secret.png", 1)  # exists, one level above the image folder
    _png(tmp_path / "crops" / "c0.png", 1)
    csv = tmp_path / "labels.csv"
    csv.write_text(f"filename,label\nc0.png,0\n{name},1\n")
    with pytest.raises(DataError, match=r"labels.csv: row 3: file name .* inside the image folder"):
        write_images_store(tmp_path / "crops", csv, tmp_path / "o.h5", size=(8, 8))
    assert list(tmp_path.glob("o.h5*")) == []


def test_file_names_in_subfolders_are_fine(tmp_path):
    _png(tmp_path / "crops" / "a" / "c0.png", 1)
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label\na/c0.png,0\n")
    assert write_images_store(tmp_path / "crops", csv, tmp_path / "o.h5", size=(8, 8)) == 1


@pytest.mark.parametrize("again", ["c0.png", "./c0.png"])
def test_image_listed_twice_names_the_row_and_leaves_no_store(tmp_path, capsys, again):
    # The file name is the sample id: a second row for one image was a ValueError traceback.
    for i in range(2):
        _png(tmp_path / "crops" / f"c{i}.png", 10 * i)
    csv = tmp_path / "labels.csv"
    csv.write_text(f"filename,label\nc0.png,0\nc1.png,1\n{again},1\n")
    out = tmp_path / "o.h5"
    code = main(
        ["data", "images", str(tmp_path / "crops"), str(csv), "--size", "8", "8"]
        + ["--out", str(out)]
    )
    assert code == 2
    error = cli_error(capsys)
    assert f"{csv}: row 4: image {again!r} is listed again (first at row 2)" in error
    assert list(tmp_path.glob("o.h5*")) == []


@pytest.mark.parametrize(("name", "dtype"), [("scan16.png", np.uint16), ("scan.tif", np.float32)])
def test_a_16_bit_png_is_scaled_from_its_own_range_not_saturated(tmp_path, name, dtype):
    from PIL import Image

    from lungbench.data.images import load_image

    ramp = np.linspace(0, 4000, 64 * 64).reshape(64, 64).astype(dtype)
    path = tmp_path / name
    Image.fromarray(ramp).save(path)  # 16-bit grey (I;16), 32-bit float (F)
    pixels = load_image(path, (64, 64))[0]
    assert pixels.min() == 0 and pixels.max() == 255
    assert (pixels == 255).mean() < 0.01, "not saturated (clipping at 255 made 99.7%)"
    assert np.corrcoef(pixels.ravel(), ramp.ravel())[0, 1] > 0.999  # linear in the value
