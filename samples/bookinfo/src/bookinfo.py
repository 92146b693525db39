#!/usr/bin/env python3
"""Ferry's bookinfo: the four services of Istio's bookinfo sample, written for Ferry's demo and
tests. One process serves one service:

  bookinfo.py productpage v1   the web page: calls details and reviews, shows both
  bookinfo.py details v1       a book's details (JSON)
  bookinfo.py reviews v1|v2|v3 two reviews (JSON); v2 and v3 also call ratings and add stars
                               (black for v2, red for v3), v1 shows none
  bookinfo.py ratings v1       the reviewers' ratings (JSON)

Each listens on $PORT (default 9080) on every address. A service reaches another by its name
(`reviews`, Host `reviews:9080`), at the address Kubernetes gives its pods in the environment
(`REVIEWS_SERVICE_HOST`, `REVIEWS_SERVICE_PORT`), else through DNS, like Istio's apps. Calls
carry on the request id, the trace headers and `end-user` (set by productpage for a user who
logged in), which routing rules may match. $POD_NAME names the pod in answers.

productpage paths: /productpage (HTML, title "Simple Bookstore App", "Reviews served by:
reviews-vN"), /login (POST form or ?user=NAME: sets the session cookie), /logout,
/api/v1/products, /api/v1/products/ID, /api/v1/products/ID/reviews,
/api/v1/products/ID/ratings, /static/..., /health. Timeouts as Istio's productpage: 3 s per
call, reviews asked twice before giving up; reviews v2 waits 10 s for ratings, v3 2.5 s.

Prints `ready` once it accepts connections; exits on SIGTERM.
"""

import html
import http.client
import json
import os
import signal
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERVICE = sys.argv[1] if len(sys.argv) > 1 else ""
VERSION = sys.argv[2] if len(sys.argv) > 2 else "v1"
PORT = int(os.environ.get("PORT", "9080"))
POD = os.environ.get("POD_NAME", f"{SERVICE}-{VERSION}")

# Headers a service passes on to the next (request id, trace context, the routing user).
FORWARDED = [
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "end-user",
    "user-agent",
]

BOOK = {
    "id": 0,
    "title": "The Comedy of Errors",
    "descriptionHtml": "A farce of mistaken identities: two pairs of twins, one town, one day.",
}
DETAILS = {
    "id": 0,
    "author": "William Shakespeare",
    "year": 1595,
    "type": "paperback",
    "pages": 200,
    "publisher": "PublisherA",
    "language": "English",
    "ISBN-10": "1234567890",
    "ISBN-13": "123-1234567890",
}
REVIEWS = [
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
    ("Reviewer2", "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare."),
]
RATINGS = {"Reviewer1": 5, "Reviewer2": 4}


def upstream(name):
    """The address of service `name` and the Host header that names it."""
    key = name.upper().replace("-", "_")
    host = os.environ.get(f"{key}_SERVICE_HOST", name)
    port = int(os.environ.get(f"{key}_SERVICE_PORT", "9080"))
    return host, port, f"{name}:{port}"


def call(name, path, headers, timeout):
    """GET `path` from service `name`: (status, parsed JSON or None). Status 0 when the call
    failed (refused, reset, timed out)."""
    host, port, authority = upstream(name)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={**headers, "Host": authority})
        resp = conn.getresponse()
        body = resp.read()
        try:
            doc = json.loads(body) if resp.status == 200 else None
        except ValueError:
            doc = None
        return resp.status, doc
    except OSError:
        return 0, None
    finally:
        conn.close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"bookinfo-{SERVICE}"
    sys_version = ""

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def forwarded(self):
        return {h: self.headers[h] for h in FORWARDED if self.headers.get(h)}

    def send(self, status, body, content_type="application/json", extra=()):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, status, doc):
        self.send(status, json.dumps(doc))

    def do_HEAD(self):
        self.do_GET()

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode(errors="replace"))
        if SERVICE == "productpage" and self.path.split("?")[0] == "/login":
            return self.login((form.get("username") or [""])[0])
        self.send_json(404, {"error": "not found"})

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if path == "/health":
            return self.send_json(200, {"status": f"{SERVICE} is healthy"})
        handler = {
            "productpage": self.productpage_paths,
            "details": self.details_paths,
            "reviews": self.reviews_paths,
            "ratings": self.ratings_paths,
        }.get(SERVICE)
        if handler is None or not handler(path, urllib.parse.parse_qs(url.query)):
            self.send_json(404, {"error": f"{path} not found"})

    # ------------------------------------------------------------------ details, ratings

    def details_paths(self, path, _query):
        if not path.startswith("/details/"):
            return False
        book = path.rsplit("/", 1)[1]
        if not book.isdigit():
            self.send_json(400, {"error": "please provide numeric product id"})
            return True
        self.send_json(200, {**DETAILS, "id": int(book)})
        return True

    def ratings_paths(self, path, _query):
        if not path.startswith("/ratings/"):
            return False
        book = path.rsplit("/", 1)[1]
        if not book.isdigit():
            self.send_json(400, {"error": "please provide numeric product id"})
            return True
        self.send_json(200, {"id": int(book), "ratings": RATINGS})
        return True

    # ------------------------------------------------------------------ reviews

    def reviews_paths(self, path, _query):
        if not path.startswith("/reviews/"):
            return False
        book = path.rsplit("/", 1)[1]
        if not book.isdigit():
            self.send_json(400, {"error": "please provide numeric product id"})
            return True
        reviews = [{"reviewer": r, "text": t} for r, t in REVIEWS]
        if VERSION in ("v2", "v3"):
            color = "black" if VERSION == "v2" else "red"
            timeout = 10.0 if VERSION == "v2" else 2.5
            status, doc = call("ratings", f"/ratings/{book}", self.forwarded(), timeout)
            for review in reviews:
                if status == 200 and doc:
                    stars = doc.get("ratings", {}).get(review["reviewer"])
                    review["rating"] = {"stars": stars, "color": color}
                else:
                    review["rating"] = {"error": "Ratings service is currently unavailable"}
        self.send_json(
            200,
            {"id": book, "podname": POD, "clustername": "null", "version": VERSION, "reviews": reviews},
        )
        return True

    # ------------------------------------------------------------------ productpage

    def user(self):
        for part in (self.headers.get("Cookie") or "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "session" and v:
                return urllib.parse.unquote(v)
        return None

    def upstream_headers(self):
        headers = self.forwarded()
        user = self.user()
        if user:
            headers["end-user"] = user
        return headers

    def login(self, user):
        cookie = f"session={urllib.parse.quote(user)}; Path=/"
        self.send(302, "", "text/plain", [("Location", "/productpage"), ("Set-Cookie", cookie)])

    def reviews(self, book):
        # Two tries of 3 s each, as Istio's productpage: a reviews call held longer than that
        # shows the "unavailable" text after about 6 s.
        status = 0
        for _ in range(2):
            status, doc = call("reviews", f"/reviews/{book}", self.upstream_headers(), 3.0)
            if status == 200 and doc:
                return status, doc
        return status, None

    def productpage_paths(self, path, query):
        if path == "/login":
            self.login((query.get("user") or [""])[0])
            return True
        if path == "/logout":
            self.send(302, "", "text/plain", [("Location", "/productpage"), ("Set-Cookie", "session=; Path=/; Max-Age=0")])
            return True
        if path.startswith("/static/"):
            self.send(200, "body { font-family: sans-serif; }\n", "text/css")
            return True
        if path == "/api/v1/products":
            self.send_json(200, [BOOK])
            return True
        if path.startswith("/api/v1/products/"):
            parts = path.split("/")[4:]
            if not parts or not parts[0].isdigit():
                return False
            book = parts[0]
            rest = parts[1] if len(parts) > 1 else ""
            if rest == "":
                status, doc = call("details", f"/details/{book}", self.upstream_headers(), 3.0)
            elif rest == "reviews":
                status, doc = self.reviews(book)
            elif rest == "ratings":
                status, doc = call("ratings", f"/ratings/{book}", self.upstream_headers(), 3.0)
            else:
                return False
            if status == 200 and doc is not None:
                self.send_json(200, doc)
            else:
                self.send_json(status or 503, {"error": f"upstream answered {status}"})
            return True
        if path == "/productpage":
            self.send(200, self.page(), "text/html; charset=utf-8")
            return True
        if path == "/":
            self.send(200, "<html><head><title>Simple Bookstore App</title></head><body><a href=\"/productpage\">bookinfo</a></body></html>", "text/html; charset=utf-8")
            return True
        return False

    def page(self):
        user = self.user()
        d_status, details = call("details", "/details/0", self.upstream_headers(), 3.0)
        r_status, reviews = self.reviews(0)
        out = [
            "<!DOCTYPE html>",
            "<html><head><meta charset=\"utf-8\"><title>Simple Bookstore App</title>",
            "<link rel=\"stylesheet\" href=\"static/bookinfo.css\"></head><body>",
            f"<p class=\"user\">{html.escape(user) if user else 'not logged in'} "
            f"(<a href=\"{'logout' if user else 'login?user=jason'}\">{'sign out' if user else 'sign in as jason'}</a>)</p>",
            f"<h1>{html.escape(BOOK['title'])}</h1>",
            f"<p>{BOOK['descriptionHtml']}</p>",
            "<h2>Book Details</h2>",
        ]
        if details:
            out.append("<dl class=\"details\">")
            for k in ("type", "pages", "publisher", "language", "ISBN-10", "ISBN-13"):
                out.append(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(details.get(k)))}</dd>")
            out.append("</dl>")
        else:
            out.append(f"<p class=\"error\">Error fetching product details! (status {d_status})</p>")
        out.append("<h2>Book Reviews</h2>")
        if reviews:
            for review in reviews.get("reviews", []):
                out.append("<blockquote>")
                out.append(f"<p>{html.escape(review['text'])}</p><small>{html.escape(review['reviewer'])}</small>")
                rating = review.get("rating")
                if rating and "stars" in rating:
                    stars = "&#9733;" * int(rating["stars"] or 0)
                    out.append(f"<p class=\"stars {rating['color']}\">{stars}</p>")
                elif rating:
                    out.append(f"<p class=\"error\">{html.escape(rating['error'])}</p>")
                out.append("</blockquote>")
            version = reviews.get("version", "?")
            out.append(
                f"<p class=\"served-by\">Reviews served by: reviews-{html.escape(version)} "
                f"(pod {html.escape(str(reviews.get('podname')))})</p>"
            )
        else:
            out.append(
                f"<p class=\"error\">Sorry, product reviews are currently unavailable for this book. (status {r_status})</p>"
            )
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def main():
    if SERVICE not in ("productpage", "details", "reviews", "ratings"):
        sys.exit(f"usage: bookinfo.py productpage|details|reviews|ratings [VERSION] (got {SERVICE!r})")
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
