<!doctype html><title>{{room}}</title>
