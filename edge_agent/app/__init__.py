"""The composition root: builds the agent from its settings and runs it (`agent`), serves it
under uvicorn (`server`), and the `edge-agent` command line (`cli`) with its start-up checks
(`preflight`) and systemd notifications (`sdnotify`). No other module of the agent imports this
package (a contract in .importlinter)."""
