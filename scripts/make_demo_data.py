"""Generate peft_fast/demo_data/intents.jsonl, the embedded demo's labelled intent data set.

Six intents, each written as several hand-made sentence templates filled with slot values. The
split is by template: the test set's sentences use phrasings the model never trains on, so the
held-out accuracy measures generalisation, not memorised wording. Run once; the output is
committed (deterministic: fixed seed).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TEMPLATES = {
    "weather": [
        "what is the weather like in {city} {when}",
        "will it rain in {city} {when}",
        "do i need an umbrella {when} in {city}",
        "how hot will it be in {city} {when}",
        "is it going to snow in {city} {when}",
        "tell me the forecast for {city} {when}",
        "how cold is it outside in {city} {when}",
        "should i wear a jacket in {city} {when}",
        "what temperature is expected {when} in {city}",
        "is there a storm coming to {city} {when}",
        "will the sun be out in {city} {when}",
        "give me the weather report for {city} {when}",
    ],
    "play_music": [
        "play some {genre} music",
        "put on a {genre} playlist please",
        "i want to listen to {artist}",
        "start playing songs by {artist}",
        "can you play {genre} for me",
        "shuffle my {genre} songs",
        "play the latest album from {artist}",
        "turn on some {genre} tunes while i {activity}",
        "i feel like hearing {artist} right now",
        "queue up a few {genre} tracks",
        "let me hear something by {artist}",
        "music please, something {genre}",
    ],
    "set_alarm": [
        "wake me up at {time}",
        "set an alarm for {time} {when}",
        "i need an alarm at {time}",
        "please set my alarm to {time}",
        "create an alarm for {time} so i can {activity}",
        "remind me at {time} {when} to get up",
        "make sure i am awake by {time}",
        "alarm at {time} please",
        "can you wake me at {time} {when}",
        "schedule a wake up call for {time}",
        "put an alarm on for {time} {when}",
        "i have to be up at {time}, set an alarm",
    ],
    "book_restaurant": [
        "book a table for {people} at a {cuisine} restaurant",
        "reserve dinner for {people} people {when}",
        "i want to eat {cuisine} food {when}, make a reservation",
        "find me a {cuisine} place and book it for {people}",
        "can you get us a table for {people} {when}",
        "make a booking at a {cuisine} restaurant in {city}",
        "reserve a spot for {people} at the {cuisine} bistro",
        "we would like to have {cuisine} dinner {when}, please book",
        "get a reservation for {people} at {time}",
        "table for {people} at a {cuisine} place {when}",
        "book us somewhere that serves {cuisine} in {city}",
        "secure a dinner table for {people} {when} at {time}",
    ],
    "book_flight": [
        "book a flight from {city} to {city2}",
        "i need a plane ticket to {city2} {when}",
        "find flights to {city2} leaving {when}",
        "get me on a flight from {city} to {city2} {when}",
        "how much is a ticket from {city} to {city2}",
        "reserve a seat on the next plane to {city2}",
        "i want to fly to {city2} {when}",
        "search for cheap flights from {city} to {city2}",
        "are there any direct flights to {city2} {when}",
        "book me a one way ticket to {city2}",
        "i have to travel by air to {city2} {when}",
        "look up a return flight between {city} and {city2}",
    ],
    "bank_balance": [
        "what is my account balance",
        "how much money is in my {account} account",
        "check the balance of my {account} account",
        "tell me how much i have in {account}",
        "show my current {account} balance",
        "do i have enough money in my {account} account to {activity}",
        "what is left in my {account} account {when}",
        "how much can i spend from {account} right now",
        "give me my {account} account balance please",
        "how much cash do i have in the bank",
        "what are my funds in {account} looking like",
        "balance of {account} please",
    ],
}
SLOTS = {
    "city": ["paris", "london", "tokyo", "berlin", "new york", "madrid", "rome", "sydney", "toronto", "chicago"],
    "city2": ["lisbon", "boston", "dubai", "seoul", "vienna", "miami", "oslo", "prague", "denver", "singapore"],
    "when": ["today", "tomorrow", "this weekend", "tonight", "on friday", "next week", "this evening", "on monday"],
    "genre": ["jazz", "rock", "classical", "hip hop", "country", "pop", "blues", "electronic"],
    "artist": ["the beatles", "taylor swift", "miles davis", "queen", "adele", "bob marley", "beyonce", "mozart"],
    "activity": ["go running", "cook dinner", "study", "pay rent", "work out", "clean the house", "buy groceries"],
    "time": ["6 am", "7:30", "5:45 in the morning", "8 o'clock", "noon", "9:15", "half past six"],
    "people": ["two", "four", "three", "six", "a party of five", "eight"],
    "cuisine": ["italian", "thai", "mexican", "japanese", "indian", "french", "chinese", "greek"],
    "account": ["checking", "savings", "credit card", "joint", "business"],
}
PER_TEMPLATE = 6
TEST_TEMPLATES = 3  # the last three templates of each intent are held out


def fill(template: str, rng: random.Random) -> str:
    values = {slot: rng.choice(options) for slot, options in SLOTS.items()}
    return template.format(**values)


def main() -> None:
    rng = random.Random(20261124)
    records = []
    for label, templates in TEMPLATES.items():
        for index, template in enumerate(templates):
            split = "test" if index >= len(templates) - TEST_TEMPLATES else "train"
            seen = set()
            for _ in range(PER_TEMPLATE * 4):
                text = fill(template, rng)
                if text not in seen:
                    seen.add(text)
                    records.append({"text": text, "label": label, "split": split})
                if len(seen) == PER_TEMPLATE:
                    break
    out = Path(__file__).resolve().parents[1] / "peft_fast" / "demo_data" / "intents.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    counts = {s: sum(r["split"] == s for r in records) for s in ("train", "test")}
    print(f"wrote {len(records)} records to {out}: {counts}")


if __name__ == "__main__":
    main()
