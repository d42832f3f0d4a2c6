"""lmsqueeze.train"""
