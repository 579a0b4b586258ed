"""The parts a held poll's traced bytes are summed into (bench/anatomy.py measures them,
docs/results.md shows them before and after): one definition for both."""

# Where each traced allocation site of a held poll belongs, by the file it is in (the first
# match wins); the park's own line in chattle_rooms.py is the saved C stack and the parked
# frame's object, which greenlet allocates there.
PARTS = (("saved C stack and the parked frame", ("chattle_rooms.py:PARK",)),
         ("greenlet (object, start arguments)", ("gevent/hub.py",)),
         ("socket objects (gevent socket, _socket, read and write watchers, address)",
          ("gevent/server.py", "gevent/_socket3.py")),
         ("connection reader and request body (RequestReader, pywsgi.Input)",
          ("chattle_request.py", "chattle_http.py:READER", "chattle_http.py:INPUT")),
         ("Event link and the wait (bound switch, Event, deadline)", ("chattle_rooms.py",)),
         ("handler, WSGI environ, Bottle's request state, the held poll",
          ("chattle_http.py", "gevent/pywsgi.py", "bottle.py", "chattle.py")))
