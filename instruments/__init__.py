"""The instruments every harness command and test measures with, one definition each:
what a figure means (measures), when an answer arrived (stamps), how far apart two
clocks are (clocks), how an HTTP answer is framed (httpframe), and the report page that
names the machine a figure came from (page). The server never imports them.
"""
