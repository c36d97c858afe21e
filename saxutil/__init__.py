"""The `saxutil` program: the client's commands (client.cli) and, beside them, the commands that
start or change the other parts: `up` (a local cell), `migrate` (the admin's database) and
`convert` (checkpoints). It lives beside the client library, not inside it: the client imports no
server part, and these commands reach the parts that own the work only when they run."""
