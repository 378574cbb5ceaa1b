"""A local HTTP server for download tests: serves bytes by name, honours Range, can drop a transfer part-way."""
import contextlib
import http.server
import socket
import threading


@contextlib.contextmanager
def serve(files: dict[str, bytes], drop_first_after: int | None = None):
  """Yields (base_url, log): log lists (path, Range header) of every request.

  drop_first_after=n: the first request for each file sends the full length in
  its headers, then n bytes, then closes the connection.
  """
  log, dropped = [], set()

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # pylint: disable=invalid-name
      name = self.path.lstrip("/")
      log.append((name, self.headers.get("Range")))
      if name not in files:
        self.send_error(404)
        return
      body, start = files[name], 0
      if self.headers.get("Range"):
        start = int(self.headers["Range"].split("=")[1].split("-")[0])
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
      else:
        self.send_response(200)
      self.send_header("Content-Length", str(len(body) - start))
      self.end_headers()
      if drop_first_after is not None and name not in dropped:
        dropped.add(name)
        self.wfile.write(body[start:start + drop_first_after])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)
        return
      self.wfile.write(body[start:])

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}", log
  finally:
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
  """A URL on 127.0.0.1 where nothing listens (connection refused at once)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}"
