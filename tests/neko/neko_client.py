#!/usr/bin/env python3
"""A N.E.K.O. frontend in miniature (Debian's python3-websockets), for tests/neko_protocol.rs.

Usage: neko_client.py ws://host:port/ws/<character> <rate_hz> [one-turn]

(`one-turn`: only the first turn, for models whose replies are short, e.g. the offline `local` one.)

Speaks an eSpeak NG sentence as 10 ms int16 JSON arrays at <rate_hz> (48000: desktop, 16000:
mobile), hears the reply (audio_chunk + one binary PCM16 48 kHz frame each), then asks again and
barges in mid-reply. Asserts N.E.K.O.'s rules itself and prints one JSON summary line.
"""
import asyncio
import json
import math
import struct
import subprocess
import sys
import time

import websockets


def espeak(text, rate):
    wav = subprocess.run(["espeak-ng", "--stdout", "-s", "150", text], check=True, capture_output=True).stdout
    # RIFF header: the sample rate at byte 24; the data chunk follows "data" + its length.
    src_rate = struct.unpack_from("<I", wav, 24)[0]
    data = wav[wav.index(b"data") + 8:]
    src = struct.unpack("<%dh" % (len(data) // 2), data[: len(data) // 2 * 2])
    n = int(len(src) * rate / src_rate)
    # Linear interpolation is plenty for a test utterance.
    out = []
    for i in range(n):
        x = i * src_rate / rate
        j = int(x)
        f = x - j
        a = src[j] if j < len(src) else 0
        b = src[j + 1] if j + 1 < len(src) else 0
        out.append(int(a + (b - a) * f))
    return out


def rms(samples):
    return math.sqrt(sum(s * s for s in samples) / len(samples)) if samples else 0.0


class Client:
    def __init__(self, ws, rate):
        self.ws = ws
        self.rate = rate
        self.msgs = []  # (time, dict)
        self.audio = {}  # speech_id -> [samples]
        self.chunk_times = {}  # speech_id -> [arrival times]
        self.pending_chunk = None
        self.errors = []

    async def reader(self):
        async for m in self.ws:
            now = time.monotonic()
            if isinstance(m, bytes):
                if self.pending_chunk is None:
                    self.errors.append("a binary frame without an audio_chunk before it")
                    continue
                sid = self.pending_chunk
                self.pending_chunk = None
                self.audio.setdefault(sid, []).extend(struct.unpack("<%dh" % (len(m) // 2), m))
                self.chunk_times.setdefault(sid, []).append(now)
                continue
            msg = json.loads(m)
            if msg.get("type") == "audio_chunk":
                if self.pending_chunk is not None:
                    self.errors.append("two audio_chunk headers without a binary frame between")
                self.pending_chunk = msg["speech_id"]
            self.msgs.append((now, msg))

    def of(self, ty):
        return [m for _, m in self.msgs if m.get("type") == ty]

    async def wait(self, what, pred, timeout=30.0):
        end = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > end:
                raise AssertionError("timed out waiting for %s; got %s" % (what, [m for _, m in self.msgs][-20:]))
            await asyncio.sleep(0.02)

    async def stream(self, samples, until=None, timeout=30.0):
        """10 ms int16 arrays in real time; then silence until `until()` (if given)."""
        n = self.rate // 100
        start = time.monotonic()
        k = 0
        while True:
            chunk = samples[k * n:(k + 1) * n]
            if len(chunk) < n:
                if until is None or until():
                    return
                if time.monotonic() - start > timeout:
                    raise AssertionError("timed out; last messages: %s" % [m for _, m in self.msgs][-10:])
                chunk = list(chunk) + [0] * (n - len(chunk))
            await self.ws.send(json.dumps({"action": "stream_data", "input_type": "audio", "data": list(chunk)}))
            k += 1
            delay = start + k * 0.01 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


async def main(url, rate, one_turn=False):
    speech = espeak("Hello there. What is your name, and what can you do?", rate)
    async with websockets.connect(url, max_size=None) as ws:
        c = Client(ws, rate)
        reader = asyncio.create_task(c.reader())
        await ws.send(json.dumps({"action": "start_session", "input_type": "audio", "new_session": True}))
        await c.wait("session_started", lambda: c.of("session_started"), 15)
        assert c.of("session_preparing"), "session_preparing comes first"
        await ws.send(json.dumps({"action": "ping"}))
        await c.wait("pong", lambda: c.of("pong"), 5)

        # Turn 1: the whole reply.
        await c.stream(speech, until=lambda: any(m.get("data") == "turn end" for m in c.of("system")), timeout=40)
        first = [m["speech_id"] for m in c.of("audio_chunk")]
        assert first, "audio_chunk messages for the reply"
        sid1 = first[0]
        assert set(first) == {sid1}, "one speech_id per reply: %s" % set(first)
        texts1 = [m for m in c.of("gemini_response") if m["turn_id"] == sid1]
        assert texts1, "gemini_response text for the reply"
        assert [m["isNewMessage"] for m in texts1].count(True) == 1 and texts1[0]["isNewMessage"], (
            "one isNewMessage:true per reply, first: %s" % texts1[:3]
        )
        reply_text = "".join(m["text"] for m in texts1)
        pcm1 = c.audio[sid1]
        if one_turn:
            assert not c.errors, c.errors
            print(json.dumps({
                "rate": rate, "reply_s": len(pcm1) / 48000.0, "reply_rms": rms(pcm1), "reply_text": reply_text,
                "user_transcripts": [m["text"] for m in c.of("user_transcript")],
            }))
            return

        # Turn 2: ask again and barge in a second into the reply.
        n_before = len(c.of("audio_chunk"))
        await c.stream(speech, until=lambda: len(c.of("audio_chunk")) > n_before + 50, timeout=30)
        sid2 = c.of("audio_chunk")[-1]["speech_id"]
        assert sid2 != sid1, "a new speech_id per reply"
        await c.stream(speech, until=lambda: c.of("user_activity"), timeout=15)
        act = c.of("user_activity")[0]
        assert act["interrupted_speech_id"] == sid2, "user_activity names the playing speech: %s" % act
        cut_at = next(t for t, m in c.msgs if m.get("type") == "user_activity")
        await asyncio.sleep(1.0)
        late = [t for t in c.chunk_times.get(sid2, []) if t > cut_at + 0.05]
        assert not late, "%d chunks of the interrupted speech after user_activity" % len(late)
        texts2 = [m for m in c.of("gemini_response") if m["turn_id"] == sid2]
        assert [m["isNewMessage"] for m in texts2].count(True) <= 1
        assert not c.errors, c.errors

        await ws.send(json.dumps({"action": "end_session"}))
        try:
            await asyncio.wait_for(reader, 5)
        except asyncio.TimeoutError:
            raise AssertionError("the server did not close after end_session")
        print(json.dumps({
            "rate": rate,
            "speech_s": len(speech) / rate,
            "reply_s": len(pcm1) / 48000.0,
            "reply_rms": rms(pcm1),
            "reply_text": reply_text,
            "emotions": [m["emotion"] for m in c.of("emotion")],
            "interrupted_after_s": len(c.audio.get(sid2, [])) / 48000.0,
            "close_code": ws.close_code,
        }))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), len(sys.argv) > 3 and sys.argv[3] == "one-turn"))
