"""A GCS stand-in for tests: object_store's GCS client speaks Google's XML API, which is S3's
wire protocol with x-goog-* header names. No emulator on PyPI or npm accepts those requests
(gcp-storage-emulator: no HEAD, no ETag, no preconditions, no multipart; fake-gcs-server:
every PUT goes to its JSON upload handler, "invalid uploadType"). This loopback proxy renames
the headers and forwards to moto's S3 server; everything else (paths, queries, ranges,
multipart, list) passes unchanged.

usage: gcs_proxy.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT
"""
import http.client
import http.server
import socketserver
import sys

UPSTREAM = (sys.argv[2], int(sys.argv[3]))
# moto does not check signatures, but treats a request without one as anonymous.
DUMMY_AUTH = ("AWS4-HMAC-SHA256 Credential=gcs-stand-in/20260101/us-east-1/s3/aws4_request, "
              "SignedHeaders=host, Signature=0")
HOP = {"authorization", "host", "connection", "expect", "content-length"}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        out = {}
        for name, value in self.headers.items():
            low = name.lower()
            if low in HOP:
                continue
            if low == "x-goog-if-generation-match":
                # Generation 0 is "create only". Others are never sent by cloud-dump: refuse
                # rather than drop the precondition.
                if value.strip() != "0":
                    self.send_error(501, "generation preconditions other than 0 are not emulated")
                    return
                out["If-None-Match"] = "*"
            elif low == "x-goog-copy-source":
                out["x-amz-copy-source"] = "/" + value
            elif low.startswith("x-goog-meta-"):
                out["x-amz-meta-" + name[len("x-goog-meta-"):]] = value
            else:
                out[name] = value
        out["Content-Length"] = str(len(body))
        out["Authorization"] = DUMMY_AUTH
        conn = http.client.HTTPConnection(*UPSTREAM, timeout=120)
        conn.request(self.command, self.path, body=body if body else None, headers=out)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for name, value in resp.getheaders():
            low = name.lower()
            if low in ("transfer-encoding", "connection", "content-length", "server", "date"):
                continue
            if low.startswith("x-amz-meta-"):
                name = "x-goog-meta-" + name[len("x-amz-meta-"):]
            self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
