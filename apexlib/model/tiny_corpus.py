"""A small English corpus embedded in the package, for training the tiny tokenizer offline.

The text was written for this project (no third-party content). It is varied on purpose
(prose, dialogue, numbers, code-like lines, punctuation) so that a byte-level BPE trained on it
learns common English subwords and the embedded demo model sees realistic token streams.
``SAMPLE_PROMPTS`` are short, varied prompts used by tests, examples and notebooks.
"""

from __future__ import annotations

CORPUS_PARAGRAPHS: tuple[str, ...] = (
    "The morning train left the station at seven, carrying farmers, students and a man with a "
    "violin case who never looked up from his book. Outside the windows, the fields were still "
    "grey with frost, and the river ran slow and dark beside the tracks.",
    "To make bread, mix four cups of flour with a spoon of salt, a little yeast and warm water. "
    "Knead the dough for ten minutes until it is smooth, then let it rise in a warm place for an "
    "hour. Shape the loaf, bake it in a hot oven, and let it cool before you cut it.",
    "A computer program is a list of instructions. The processor reads each instruction from "
    "memory, decodes it, and executes it. Modern processors run many instructions at the same "
    "time, predict which branch a program will take, and keep recent data in small, fast caches.",
    "In the garden, the tomatoes needed water every evening during the hot weeks of summer. "
    "The beans climbed the fence, the roses opened slowly, and the old apple tree gave more "
    "fruit than the family could eat, so they shared it with their neighbours.",
    "Printing with movable type changed how ideas travelled. Before the press, a book was copied "
    "by hand, one page at a time, and it could take a scribe a whole year. After the press, "
    "hundreds of copies could be made in a few weeks, and reading spread across the world.",
    "The sea was calm when the boat left the harbour, but by noon the wind had turned and the "
    "waves grew tall. The captain told everyone to stay below, tied the sails, and steered "
    "toward the lighthouse that stood on the rocks at the end of the island.",
    "Mathematics studies numbers, shapes and patterns. One plus one is two, two times three is "
    "six, and the sum of the angles of a triangle is one hundred and eighty degrees. A prime "
    "number has exactly two divisors: one and itself. The first primes are 2, 3, 5, 7, 11 and 13.",
    '"Where are you going?" asked the girl. "To the market," said her brother, "to buy eggs, '
    'milk and a loaf of bread." "Can I come with you?" "Only if you carry the basket."',
    "The library opened at nine. People came to read newspapers, to borrow novels, to study for "
    "examinations, or simply to sit somewhere quiet and warm. The librarian knew most of them by "
    "name and remembered which books each of them liked.",
    "Water boils at one hundred degrees Celsius at sea level. On a high mountain the air pressure "
    "is lower, so water boils at a lower temperature and food takes longer to cook. Ice melts at "
    "zero degrees, and salt water freezes at a slightly lower temperature than fresh water.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n",
    "The city grew around the river. First there was a bridge, then a market beside the bridge, "
    "then houses, churches, schools and factories. Today the old bridge is still there, and "
    "tourists take photographs of it every day, while boats pass quietly underneath.",
    "Birds migrate thousands of kilometres every year. They follow the coastlines, the rivers "
    "and the mountains, and some of them navigate by the stars or by the magnetic field of the "
    "earth. In spring they return to the same places where they were born.",
    "A good meeting has a clear purpose, a short list of topics and a fixed end time. Everyone "
    "should know why they are there, what decision must be made, and who will do the work "
    "afterwards. Notes should be written down and shared on the same day.",
    "The old clock in the hall stopped at a quarter past three. Nobody knew why. The clockmaker "
    "came on Tuesday, opened the case, cleaned the gears, replaced a small spring, and the clock "
    "has been ticking ever since, loud enough to hear from the kitchen.",
    "Light travels at about three hundred thousand kilometres per second. The light from the sun "
    "takes a little more than eight minutes to reach the earth, and the light from the nearest "
    "star takes more than four years. When we look at the night sky, we look into the past.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week. "
    "January, February, March, April, May, June, July, August, September, October, November and "
    "December are the months of the year. Spring, summer, autumn and winter are the seasons.",
    "The children built a castle of sand near the water. They dug a moat, decorated the towers "
    "with shells, and waited for the tide. When the first wave reached the walls, they laughed "
    "and ran back up the beach, and by evening the castle was gone.",
    "Good software is tested. A unit test checks one small function; an integration test checks "
    "that the parts work together. When a test fails, the programmer reads the error, finds the "
    "cause, fixes the code and runs the tests again until they all pass.",
    "The forest was quiet after the snow. Tracks of a fox crossed the path, and somewhere a "
    "woodpecker knocked on a tree. The hikers walked slowly, breathing clouds into the cold air, "
    "and stopped at the top of the hill to drink hot tea from a flask.",
    "Memory is slower than the processor, so a computer keeps copies of recent data close to "
    "where it is needed. Reading from a cache takes a few nanoseconds; reading from main memory "
    "takes about a hundred. Moving data between a graphics card and the host is slower still.",
    "Once upon a time there was a small village at the edge of a great forest. The people of the "
    "village were farmers and weavers, and every autumn they held a festival with music, dancing "
    "and long tables full of food. Travellers came from far away to see it.",
    "Numbers: zero, one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, "
    "twenty, thirty, forty, fifty, one hundred, one thousand, one million. 1, 2, 3, 4, 5, 6, 7, "
    "8, 9, 10, 100, 1000, 2024, 3.14, 2.71, 42.",
    "The doctor listened to his heart, looked at his throat and asked him how long he had been "
    "coughing. \"About a week,\" he said. She told him to rest, to drink plenty of water, and to "
    "come back if the fever did not go away in three days.",
    "Rivers carry water from the mountains to the sea. Along the way they cut valleys, move "
    "stones and sand, and feed the fields and forests on their banks. Large rivers have been "
    "roads for trade for thousands of years, long before there were railways.",
    "She opened the letter carefully. It was from her grandmother, written in small, neat "
    "handwriting, and it smelled faintly of lavender. Inside there was a photograph of a house "
    "by the sea, and on the back someone had written: the summer of nineteen fifty two.",
    "An engine turns the energy of fuel into motion. In a car, small explosions push pistons "
    "down, the pistons turn a shaft, and the shaft turns the wheels. Electric cars use a motor "
    "and a battery instead, which makes them quieter and simpler to maintain.",
    "The museum had three floors. On the first floor were old tools and coins, on the second "
    "floor paintings of ships and harbours, and on the third floor a large map of the region "
    "as it looked two hundred years ago, with roads, villages and windmills.",
    "Question: What is the capital of France? Answer: Paris. Question: How many legs does a "
    "spider have? Answer: Eight. Question: What colour is the sky on a clear day? Answer: Blue.",
    "Every language has its own rhythm. Some languages put the verb at the end of the sentence, "
    "others at the beginning. Children learn the language around them without any lessons, "
    "simply by listening, repeating, and making many small mistakes.",
    "The team met on Friday to plan the next release. They agreed to fix the three most "
    "important bugs first, to write better documentation, and to measure how fast the new "
    "version runs on small and large machines before they publish it.",
    "At night the town was very quiet. The shops were closed, the streets were empty, and only "
    "the baker was awake, preparing the dough for the morning. By six o'clock the smell of fresh "
    "bread filled the square, and the first customers were waiting at the door.",
)

SAMPLE_PROMPTS: tuple[str, ...] = (
    "The morning train left the station",
    "To make bread, mix",
    "A computer program is",
    "Once upon a time",
    "Question: What is the capital of France? Answer:",
    "def add(a, b):",
    "The sea was calm when",
    "1, 2, 3, 4,",
    "She opened the letter",
    "Memory is slower than the processor, so",
    "Birds migrate",
    "The old clock in the hall",
)
