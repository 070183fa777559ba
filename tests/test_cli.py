"""The CLI's input side: folders whose sub-folders are labels, CSV manifests, and usage errors."""

import pytest

from convsearch.cli import FASHION200, UsageError, main, read_items


def test_image_folder_layout():
    items = list(read_items(FASHION200))
    assert len(items) == 200 and len({item_id for item_id, _, _ in items}) == 200
    assert items[0][0] == "ankle-boot/t10k-00000" and items[0][1] == "ankle-boot"
    assert items[0][2].startswith(b"\x89PNG")


def test_csv_manifest(tmp_path):
    (tmp_path / "img").mkdir()
    source = next(read_items(FASHION200))[2]
    (tmp_path / "img" / "a.png").write_bytes(source)
    (tmp_path / "img" / "b.png").write_bytes(source)
    (tmp_path / "list.csv").write_text("path,label\nimg/a.png,boot\nimg/b.png,\n")
    assert list(read_items(tmp_path / "list.csv")) == [("img/a", "boot", source), ("img/b", "", source)]
    (tmp_path / "bad.csv").write_text("img/missing.png,boot\n")
    with pytest.raises(UsageError, match="missing.png not found"):
        list(read_items(tmp_path / "bad.csv"))


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["--gateway", "127.0.0.1:1", "ingest", str(tmp_path), "--dataset", "x"]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert main(["--gateway", "127.0.0.1:1", "datasets"]) == 3
    assert "the gateway at 127.0.0.1:1 is unavailable" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--dataset", "x"])  # neither --image nor --id
    assert exit_info.value.code == 2
    assert "one of the arguments --image --id is required" in capsys.readouterr().err
