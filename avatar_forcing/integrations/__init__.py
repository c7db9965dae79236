"""Voice-agent integrations: the avatar server as a Pipecat service and as a LiveKit avatar worker
(optional extras: pip install avatar-forcing-server[pipecat] or [livekit])."""
