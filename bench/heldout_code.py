"""Held-out Python for the MTP benchmark: ordinary code written for this repository.

The bundled model was trained on the interpreter's standard library; nothing below is from it.
bench/mtp.py cuts its prompts from this file, so the measurement does not move when the rest of
the repository changes. (This file is data: it is never imported.)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path


class Stack:
    """A last-in, first-out stack."""

    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()

    def peek(self):
        if not self.items:
            raise IndexError("peek at an empty stack")
        return self.items[-1]

    def __len__(self):
        return len(self.items)

    def __repr__(self):
        return f"Stack({self.items!r})"


def binary_search(items, target):
    """Return the index of target in the sorted list items, or -1."""
    low, high = 0, len(items) - 1
    while low <= high:
        middle = (low + high) // 2
        if items[middle] == target:
            return middle
        if items[middle] < target:
            low = middle + 1
        else:
            high = middle - 1
    return -1


class LRUCache:
    """A dictionary that forgets the least recently used key when it is full."""

    def __init__(self, capacity):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.data = OrderedDict()

    def get(self, key, default=None):
        if key not in self.data:
            return default
        self.data.move_to_end(key)
        return self.data[key]

    def put(self, key, value):
        if key in self.data:
            self.data.move_to_end(key)
        self.data[key] = value
        if len(self.data) > self.capacity:
            self.data.popitem(last=False)


@dataclass
class Settings:
    name: str = "default"
    verbose: bool = False
    retries: int = 3
    paths: list = field(default_factory=list)

    @classmethod
    def from_file(cls, path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return cls(**data)

    def to_file(self, path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.__dict__, f, indent=2)


def read_rows(path):
    """Read a CSV file into a list of dictionaries."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return [dict(row) for row in reader]


def group_by(rows, key):
    """Group a list of dictionaries by the value of one key."""
    groups = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row)
    return dict(groups)


def count_words(text):
    counts = {}
    for word in text.lower().split():
        word = word.strip(".,;:!?\"'()")
        if word:
            counts[word] = counts.get(word, 0) + 1
    return counts


def find_files(root, suffix=".py"):
    """Yield every file below root whose name ends with suffix."""
    for directory, _, names in os.walk(root):
        for name in sorted(names):
            if name.endswith(suffix):
                yield Path(directory) / name


def fibonacci(n):
    """Return the first n Fibonacci numbers."""
    numbers = []
    a, b = 0, 1
    for _ in range(n):
        numbers.append(a)
        a, b = b, a + b
    return numbers


def is_prime(n):
    if n < 2:
        return False
    for i in range(2, int(n ** 0.5) + 1):
        if n % i == 0:
            return False
    return True


def merge_sort(items):
    if len(items) <= 1:
        return items
    middle = len(items) // 2
    left = merge_sort(items[:middle])
    right = merge_sort(items[middle:])
    result = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            result.append(left[i])
            i += 1
        else:
            result.append(right[j])
            j += 1
    result.extend(left[i:])
    result.extend(right[j:])
    return result


class Node:
    def __init__(self, value, next=None):
        self.value = value
        self.next = next


class LinkedList:
    def __init__(self):
        self.head = None
        self.size = 0

    def append(self, value):
        node = Node(value)
        if self.head is None:
            self.head = node
        else:
            current = self.head
            while current.next is not None:
                current = current.next
            current.next = node
        self.size += 1

    def __iter__(self):
        current = self.head
        while current is not None:
            yield current.value
            current = current.next

    def __len__(self):
        return self.size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Count the words of some files.")
    parser.add_argument("paths", nargs="+", help="the files to read")
    parser.add_argument("--top", type=int, default=10, help="how many words to print")
    parser.add_argument("--verbose", action="store_true", help="print more")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    totals = {}
    for path in args.paths:
        with open(path, encoding="utf-8") as f:
            for word, count in count_words(f.read()).items():
                totals[word] = totals.get(word, 0) + count
    for word, count in sorted(totals.items(), key=lambda item: -item[1])[: args.top]:
        print(f"{count:6d} {word}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
