"""The real clients of the field tests, and the driver that times them.

A client is an argv template; ``{host}``, ``{port}``, ``{url}`` are filled in per case. HTTP
clients fetch ``{url}`` from the test's HTTP listener, which records the path it was asked
for (so "it connected" is what the listener saw, not what the client said); lookup-only
clients pass when the expected address is in their output.
"""
from __future__ import annotations

PY = "/usr/bin/python3"

_CONNECT = ("import socket,sys\n"
            "try:\n"
            "    s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\n"
            "    s.sendall(b'GET '+sys.argv[3].encode()+b' HTTP/1.0\\r\\n\\r\\n'); print('connected', s.recv(100)[:12])\n"
            "except OSError as e: print('error',type(e).__name__,e); sys.exit(1)\n")
_CONNECT_ALL = ("import socket,sys,errno\n"
                "infos=socket.getaddrinfo(sys.argv[1],int(sys.argv[2]),type=socket.SOCK_STREAM)\n"
                "for fam,typ,pr,_,addr in infos:\n"
                "    s=socket.socket(fam,typ)\n"
                "    try: s.connect(addr); r='ok'\n"
                "    except OSError as e: r=errno.errorcode.get(e.errno,str(e.errno))\n"
                "    print(addr[0],r)\n")
_REQUESTS = "import requests,sys\nr=requests.get(sys.argv[1],timeout=5); print('status',r.status_code)\n"

# name -> (kind, argv); kind "http" is judged by the listener, "lookup" by the printed address
CLIENTS: dict[str, tuple[str, list[str]]] = {
    "getent": ("lookup", ["getent", "ahosts", "{host}"]),
    "python": ("http", [PY, "-c", _CONNECT, "{host}", "{port}", "/{tag}/"]),
    "curl": ("http", ["curl", "-sS", "-o", "/dev/null", "{url}"]),
    "wget": ("http", ["wget", "-nv", "-O", "/dev/null", "{url}"]),
    "busybox-wget": ("http", ["busybox", "wget", "-q", "-O", "/dev/null", "{url}"]),
    "busybox-nslookup": ("lookup", ["busybox", "nslookup", "{host}"]),
    "dig": ("lookup", ["dig", "{host}"]),
    "host": ("lookup", ["host", "{host}"]),
    "nslookup": ("lookup", ["nslookup", "{host}"]),
    "requests": ("http", [PY, "-c", _REQUESTS, "{url}"]),
    "git": ("http", ["git", "ls-remote", "{url}repo.git"]),
    "pip": ("http", [PY, "-m", "pip", "download", "--isolated", "--no-deps", "--no-cache-dir", "-q",
                     "-d", "/tmp/sd-pip", "--trusted-host", "{host}", "--index-url", "{url}simple/", "nothing-here"]),
}
# the python client that connects to every address getaddrinfo returned (prints ip + errno)
CONNECT_ALL = [PY, "-c", _CONNECT_ALL, "{host}", "{port}"]


def argv(client: str | list[str], host: str, port: int, tag: str) -> list[str]:
    tmpl = CLIENTS[client][1] if isinstance(client, str) else client
    url = f"http://{host}:{port}/{tag}/"
    return [a.format(host=host, port=port, url=url, tag=tag) for a in tmpl]
