"""Sentence templates per fact type, and prompt templates, each with a stable id.

``{name}`` is the subject (the country or city the text is about; never a span). Every other slot
is an entity and becomes a labelled span. Ids look like ``country.capital.3``; the split holds out
whole ids for the test split, so test texts are phrased in ways training never saw.
"""

from __future__ import annotations

__all__ = ["CITY_FACTS", "COUNTRY_FACTS", "PROMPTS", "template_ids"]

COUNTRY_FACTS: dict[str, list[str]] = {
    "capital": [
        "The capital of {name} is {capital}.",
        "{name}'s capital city is {capital}.",
        "Its capital, {capital}, is also the seat of the national government.",
        "The seat of government is {capital}, which serves as the capital.",
        "{capital} has been the capital of {name} for a long time.",
        "Most government institutions are based in the capital, {capital}.",
        "Visitors usually arrive first in {capital}, the capital.",
    ],
    "region": [
        "{name} is a country in {region}.",
        "Geographically, {name} lies in {region}, on the continent of {continent}.",
        "It is located in {region}.",
        "{name} belongs to the {region} region of {continent}.",
        "The country is part of {region}, within {continent}.",
        "On a map you will find {name} in {region}.",
    ],
    "population": [
        "It has a population of about {population} people.",
        "Roughly {population} people live in {name}.",
        "The population was estimated at {population}.",
        "{name} is home to around {population} inhabitants.",
        "According to recent estimates, about {population} people call it home.",
        "Its population stands at approximately {population}.",
    ],
    "area": [
        "The country covers an area of about {area} square kilometres.",
        "{name} spans roughly {area} km2.",
        "Its total area is around {area} square kilometres.",
        "With about {area} square kilometres of territory, it is not easily overlooked.",
        "The land area comes to approximately {area} km2.",
        "It occupies some {area} square kilometres.",
    ],
    "borders": [
        "{name} shares land borders with {neighbour1}.",
        "It borders {neighbour1} and {neighbour2}.",
        "Neighbouring countries include {neighbour1}, {neighbour2} and {neighbour3}.",
        "To its borders lie {neighbour1} and {neighbour2}.",
        "The country is bordered by {neighbour1}.",
        "Its neighbours are {neighbour1}, {neighbour2} and {neighbour3}, among others.",
        "Travellers can cross overland into {neighbour1} or {neighbour2}.",
    ],
    "language": [
        "The official language is {language1}.",
        "Most people speak {language1}.",
        "{language1} is the main language of {name}.",
        "Official languages include {language1} and {language2}.",
        "Both {language1} and {language2} are widely spoken.",
        "Government business is conducted in {language1}.",
        "Schools teach mainly in {language1}.",
    ],
    "currency": [
        "The currency is the {currency}.",
        "{name} uses the {currency} as its currency.",
        "Prices are quoted in the {currency}.",
        "The national currency, the {currency}, is used for everyday payments.",
        "Its monetary unit is the {currency}.",
        "Tourists can pay with the {currency} everywhere.",
    ],
    "demonym": [
        "People from {name} are called {demonym}.",
        "Its citizens are known as {demonym}.",
        "The demonym is {demonym}.",
        "Locals describe themselves as {demonym}.",
        "In English, its people are referred to as {demonym}.",
        "A person from there is {demonym}.",
    ],
    "provinces": [
        "Its administrative divisions include {province1} and {province2}.",
        "The country is divided into regions such as {province1} and {province2}.",
        "{province1} and {province2} are among its first-level divisions.",
        "Major administrative areas include {province1}, {province2} and others.",
        "Among its provinces are {province1} and {province2}.",
        "Regions like {province1} and {province2} each have their own local government.",
    ],
    "largest_city": [
        "The largest city is {city}, with about {city_population} residents.",
        "{city} is its biggest city, home to roughly {city_population} people.",
        "Its most populous city, {city}, has around {city_population} inhabitants.",
        "About {city_population} people live in {city}, the largest city.",
        "With some {city_population} residents, {city} is the biggest urban centre.",
        "The biggest city by population is {city} (about {city_population} people).",
    ],
    "calling_code": [
        "Its international dialling code is +{calling_code}.",
        "Phone numbers in {name} start with the country code +{calling_code}.",
        "To call {name} from abroad, dial +{calling_code}.",
        "The telephone country code is +{calling_code}.",
        "Callers reach it with the prefix +{calling_code}.",
        "Its calling code is +{calling_code}.",
    ],
}

CITY_FACTS: dict[str, list[str]] = {
    "country": [
        "{name} is a major city in {country}.",
        "{name} is located in {country}.",
        "The city of {name} lies in {country}.",
        "{name} is one of the main cities of {country}.",
        "Situated in {country}, {name} is an important urban centre.",
        "{name} is an important city in {country}.",
    ],
    "population": [
        "About {population} people live in the city.",
        "{name} has a population of roughly {population}.",
        "The city is home to around {population} residents.",
        "Its population is estimated at {population}.",
        "Some {population} inhabitants live within the city limits.",
        "Roughly {population} people call {name} home.",
    ],
    "region": [
        "The city is in {region}.",
        "{name} lies in {region}.",
        "It is part of the {region} region.",
        "Geographically, it belongs to {region}.",
        "It is one of the larger cities of {region}.",
        "You will find it in {region}.",
    ],
    "national_capital": [
        "The national capital is {capital}.",
        "The country's capital, {capital}, is the seat of government.",
        "The capital of the country is {capital}.",
        "Government offices are concentrated in {capital}, the capital.",
        "The country is governed from {capital}.",
        "{capital} serves as the national capital.",
    ],
    "timezone": [
        "The city keeps time in the {timezone} time zone.",
        "Clocks in {name} follow the {timezone} zone.",
        "Its time zone is {timezone}.",
        "Local time follows {timezone}.",
        "It uses the {timezone} time zone.",
        "The official time zone is {timezone}.",
    ],
    "other_city": [
        "Other large cities in the country include {other_city}.",
        "Another major city nearby is {other_city}.",
        "It is often compared with {other_city}, another big city of the country.",
        "Domestic flights connect it with {other_city}.",
        "Together with {other_city}, it is one of the country's largest cities.",
        "Many residents travel to {other_city}, another large city.",
    ],
    "language": [
        "Most residents speak {language1}.",
        "The main language spoken there is {language1}.",
        "Street signs are written in {language1}.",
        "{language1} is the language of everyday life.",
        "Local schools teach in {language1}.",
        "The language you hear most is {language1}.",
    ],
    "currency": [
        "Shops accept the {currency}.",
        "Prices are in the {currency}.",
        "The local currency is the {currency}.",
        "Visitors pay with the {currency}.",
        "Everyday purchases are made in the {currency}.",
        "The {currency} is the money used there.",
    ],
}

PROMPTS: dict[str, list[str]] = {
    "country": [
        "Tell me about {name}.",
        "What can you tell me about {name}?",
        "Give me an overview of {name}.",
        "Describe the country {name}.",
        "I'm planning a trip. What should I know about {name}?",
        "Write a short encyclopedia-style entry about {name}.",
        "What are the key facts about {name}?",
        "Summarise the geography and people of {name}.",
    ],
    "city": [
        "Tell me about {name}.",
        "What can you tell me about the city of {name}?",
        "Give me a short description of {name}.",
        "What should a visitor know about {name}?",
        "Write a brief profile of the city {name}.",
        "Describe {name}.",
    ],
}


def template_ids(kind: str, table: dict[str, list[str]]) -> list[str]:
    """All sentence-template ids of a table, e.g. ``country.capital.0``."""
    return [f"{kind}.{fact}.{i}" for fact, items in table.items() for i in range(len(items))]
