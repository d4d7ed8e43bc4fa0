"""Which images a server accepts (`llava.serve.media.MediaPolicy`), with a real HTTP server on loopback
standing in for the internet."""

from __future__ import annotations

import base64
import functools
import http.server
import threading
from pathlib import Path

import pytest

from llava.errors import ImageError
from llava.serve.media import MediaPolicy

ROOT = Path(__file__).resolve().parents[1]
PNG = (ROOT / "examples" / "shape.png").read_bytes()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A static file server on 127.0.0.1: shape.png, a big file, and a page that is not an image."""
    folder = tmp_path_factory.mktemp("web")
    (folder / "shape.png").write_bytes(PNG)
    (folder / "big.bin").write_bytes(b"\0" * 300_000)
    (folder / "page.html").write_text("<html>not an image</html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_remote_urls_only_when_allowed(web):
    with pytest.raises(ImageError, match="--allow-remote-images"):
        MediaPolicy().load(web + "/shape.png")
    policy = MediaPolicy(allow_remote=True, max_bytes=100_000, timeout_s=5)
    assert policy.load(web + "/shape.png").size == MediaPolicy().load(
        "data:image/png;base64," + base64.b64encode(PNG).decode()).size
    with pytest.raises(ImageError, match="over this server's limit"):
        policy.load(web + "/big.bin")
    with pytest.raises(ImageError, match="not a readable image"):
        policy.load(web + "/page.html")
    with pytest.raises(ImageError, match="could not fetch"):
        policy.load(web + "/missing.png")


def test_data_urls_and_other_schemes():
    policy = MediaPolicy(max_bytes=len(PNG) + 10)
    assert policy.load("data:image/png;base64," + base64.b64encode(PNG).decode()).mode == "RGB"
    assert policy.load("data:;base64," + base64.b64encode(PNG).decode()).mode == "RGB"  # type left out
    for url, words in [("data:image/png," + "x" * 10, "not a base64 data URL"),
                       ("data:image/png;base64,@@@@", "not valid base64"),
                       ("data:image/png;base64," + base64.b64encode(PNG * 2).decode(), "limit"),
                       ("ftp://example.com/a.png", r"not a data:, http\(s\): or file: URL"),
                       ("/etc/passwd", r"not a data:, http\(s\): or file: URL"), ("", "non-empty")]:
        with pytest.raises(ImageError, match=words):
            policy.load(url)


def test_file_urls_stay_inside_the_folder(tmp_path):
    inside, outside = tmp_path / "media", tmp_path / "private"
    inside.mkdir()
    outside.mkdir()
    (inside / "a.png").write_bytes(PNG)
    (outside / "b.png").write_bytes(PNG)
    (inside / "escape.png").symlink_to(outside / "b.png")
    (inside / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ImageError, match="--allowed-local-media"):
        MediaPolicy().load((inside / "a.png").as_uri())
    policy = MediaPolicy(local_dir=str(inside))
    assert policy.load((inside / "a.png").as_uri()).mode == "RGB"
    for url in [(inside / "escape.png").as_uri(), (inside / "sub" / "b.png").as_uri(),
                f"file://{inside}/../private/b.png", f"file://{inside}/%2E%2E/private/b.png",
                (outside / "b.png").as_uri()]:
        with pytest.raises(ImageError, match="outside the allowed media folder"):
            policy.load(url)
    with pytest.raises(ImageError, match="names a host"):
        policy.load(f"file://evil.example{inside}/a.png")
